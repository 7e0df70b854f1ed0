"""How closed the most closed group of each class is, in a scan's k-NN graph: the statistic a group-aware pass would use.

    python benchmarks/closed_groups.py --data ../shared/data/cifar10/cifar10_train.npz \
        --scan NAME=SCAN_DIR[:POISONS.npz] [--scan ...] --out reports/adaptive-attack/closed-groups

A poison clump (the adaptive attacker's `clump` term, attacks.adaptive) is a set whose members name one another as
nearest neighbours and that the rest of its class rarely names: a low-conductance set of the class's k-NN graph (the
weight of the edges leaving it over the smaller of its volume and the rest's). Per class of each scan (its cached
`embeddings/neighbours.npy`, the default scan's k_small neighbours), the lowest-conductance set of at least
`--min-fraction` and at most `--max-fraction` of the class is searched by sweep cuts along the leading eigenvectors of the normalised graph, in two
graphs: `union` (an edge where either end names the other) and `mutual` (where both do). Rows give its size,
conductance and, with the scan's poisons, how many of them it holds; a clean scan gives what natural classes reach.
Appends to OUT/closed_groups.jsonl and rewrites OUT/closed_groups.md. For choosing on tuning keys, not a product rule.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy.sparse import csr_matrix, diags
from scipy.sparse.linalg import eigsh

EIGENVECTORS = 8  # leading non-trivial eigenvectors swept
GRAPHS = ("union", "mutual")
PROFILE = (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5)  # class fractions at which the profile is reported


def class_graph(neighbours: np.ndarray, kind: str) -> csr_matrix:
    """The symmetric k-NN graph of one class from its (n, k) neighbour positions in the class (-1: none)."""
    n, k = neighbours.shape
    rows, cols = np.repeat(np.arange(n), k), neighbours.ravel()
    named = (cols >= 0) & (cols != rows)
    directed = csr_matrix((np.ones(int(named.sum())), (rows[named], cols[named])), shape=(n, n))
    directed.data[:] = 1.0
    graph = directed.multiply(directed.T) if kind == "mutual" else directed.maximum(directed.T)
    return csr_matrix(graph)


def prefix_conductance(order: np.ndarray, graph: csr_matrix, degrees: np.ndarray) -> np.ndarray:
    """The conductance of every prefix of `order` (entry t: the first t + 1 examples). An edge is inside the prefix
    from the length that reaches the later of its two ends."""
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    edges = graph.tocoo()
    once = edges.row < edges.col
    joins = np.maximum(rank[edges.row[once]], rank[edges.col[once]])
    internal = np.cumsum(np.bincount(joins, weights=edges.data[once], minlength=len(order)))
    volume = np.cumsum(degrees[order])
    smaller = np.minimum(volume, volume[-1] - volume)
    return np.divide(volume - 2 * internal, smaller, out=np.full(len(order), np.inf), where=smaller > 0)


def set_conductance(graph: csr_matrix, inside: np.ndarray) -> float:
    """The conductance of one set (a boolean mask over the class) in `graph`."""
    degrees = np.asarray(graph.sum(axis=1)).ravel()
    volume = degrees[inside].sum()
    internal = graph[inside][:, inside].sum()
    smaller = min(volume, degrees.sum() - volume)
    return float((volume - internal) / smaller) if smaller > 0 else float("inf")


def closed_group(graph: csr_matrix, sizes: tuple[int, int], seed: int = 0) -> tuple[np.ndarray, float, np.ndarray]:
    """The lowest-conductance set of `graph` (one class) found within `sizes` by sweep cuts (its positions, its
    conductance), and the lowest conductance the sweeps reached at every size (the class's profile: how closed a set of
    each size can be)."""
    n = graph.shape[0]
    degrees = np.asarray(graph.sum(axis=1)).ravel()
    scale = 1 / np.sqrt(np.maximum(degrees, 1e-12))
    normalised = diags(scale) @ graph @ diags(scale)
    start = np.random.default_rng(seed).random(n)
    _, vectors = eigsh(normalised, k=min(EIGENVECTORS + 1, n - 2), which="LA", v0=start)
    allowed = np.zeros(n, dtype=bool)
    allowed[sizes[0] - 1 : sizes[1]] = True
    profile = np.full(n, np.inf)
    best, best_conductance = np.zeros(0, dtype=np.int64), float("inf")
    for vector in vectors.T:
        ordered = np.argsort(vector * scale, kind="stable")
        for order in (ordered, ordered[::-1]):
            conductance = prefix_conductance(order, graph, degrees)
            profile = np.minimum(profile, conductance)
            length = int(np.argmin(np.where(allowed, conductance, np.inf))) + 1
            if conductance[length - 1] < best_conductance:
                best, best_conductance = np.sort(order[:length]), float(conductance[length - 1])
    return best, best_conductance, profile


def scan_rows(name: str, scan_dir: Path, labels: np.ndarray, poisons: np.ndarray | None, args) -> list[dict]:
    """One row per class and graph of one scan."""
    neighbours = np.load(scan_dir / "embeddings" / "neighbours.npy", allow_pickle=False)
    truth = np.zeros(len(labels), dtype=bool)
    if poisons is not None:
        truth[poisons] = True
    rows = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        position = np.full(len(labels), -1, dtype=np.int64)
        position[members] = np.arange(len(members))
        local = np.where(neighbours[members] >= 0, position[np.maximum(neighbours[members], 0)], -1)
        sizes = (max(int(args.min_fraction * len(members)), 2), int(args.max_fraction * len(members)))
        for kind in GRAPHS:
            graph = class_graph(local, kind)
            group, conductance, profile = closed_group(graph, sizes)
            rows.append(
                {
                    "scan": name,
                    "class": int(c),
                    "graph": kind,
                    "min_fraction": args.min_fraction,
                    "max_fraction": args.max_fraction,
                    "n": int(len(members)),
                    "poisons_in_class": int(truth[members].sum()),
                    "group_size": int(len(group)),
                    "conductance": conductance,
                    "poisons_in_group": int(truth[members[group]].sum()),
                    "poisons_conductance": set_conductance(graph, truth[members]) if truth[members].any() else None,
                    "profile": {f"{f:g}": float(profile[max(int(f * len(members)), 1) - 1]) for f in PROFILE},
                }
            )
            print(json.dumps(rows[-1]))
    return rows


def render(rows: list[dict]) -> str:
    lines = [
        "| scan | class | graph | class size | poisons in class | the poisons' own conductance | most closed group (sizes searched) | its conductance | poisons in it |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['scan']} | {r['class']} | {r['graph']} | {r['n']} | {r['poisons_in_class']} "
            f"| {'-' if r.get('poisons_conductance') is None else format(r['poisons_conductance'], '.3f')} "
            f"| {r['group_size']} ({r['min_fraction']:.0%}-{r['max_fraction']:.0%}) | {r['conductance']:.3f} | {r['poisons_in_group']} |"
        )
    lines += [
        "",
        "The profile: the lowest conductance the sweeps reached for a set of each size (a fraction of the class):",
        "",
        "| scan | class | graph | poisons in class | " + " | ".join(f"{f:.0%}" for f in PROFILE) + " |",
        "|" + " --- |" * (4 + len(PROFILE)),
    ]
    seen = set()
    for r in rows:
        if (r["scan"], r["class"], r["graph"]) in seen:
            continue
        seen.add((r["scan"], r["class"], r["graph"]))
        cells = " | ".join(f"{r['profile'][f'{f:g}']:.3f}" for f in PROFILE)
        lines.append(f"| {r['scan']} | {r['class']} | {r['graph']} | {r['poisons_in_class']} | {cells} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="The npz the scans were of (its y_train labels).")
    parser.add_argument("--scan", action="append", required=True, help="NAME=SCAN_DIR[:POISONS.npz]")
    parser.add_argument("--min-fraction", type=float, default=0.01, help="The smallest group, a fraction of its class.")
    parser.add_argument("--max-fraction", type=float, default=0.5, help="The largest group, a fraction of its class.")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    with np.load(args.data, allow_pickle=False) as data:
        labels = data["y_train"].astype(np.int64)
    args.out.mkdir(parents=True, exist_ok=True)
    rows_path = args.out / "closed_groups.jsonl"
    for text in args.scan:
        name, _, where = text.partition("=")
        scan_dir, _, poisons_path = where.partition(":")
        poisons = None
        if poisons_path:
            with np.load(poisons_path, allow_pickle=False) as stored:
                poisons = stored["poison_indices"]
        with rows_path.open("a") as handle:
            for row in scan_rows(name, Path(scan_dir), labels, poisons, args):
                handle.write(json.dumps(row) + "\n")
    rows = [json.loads(line) for line in rows_path.read_text().splitlines()]
    (args.out / "closed_groups.md").write_text(render(rows))


if __name__ == "__main__":
    main()
