"""How closed the most closed group of each class is, in a scan's k-NN graph: the statistic a group-aware pass would use.

    python benchmarks/closed_groups.py --data ../shared/data/cifar10/cifar10_train.npz \
        --scan NAME=SCAN_DIR[:POISONS.npz] [--scan ...] --out reports/adaptive-attack/closed-groups
    python benchmarks/closed_groups.py --scan demo-digits=SCAN_DIR ...     # labels from the scan's scores.csv
    python benchmarks/closed_groups.py ... --class-size 200 --class-size 1000 ...  # classes subsampled, k-NN redone

A poison clump (the adaptive attacker's `clump` term, attacks.adaptive) is a set whose members name one another as
nearest neighbours and that the rest of its class rarely names: a low-conductance set of the class's k-NN graph (the
weight of the edges leaving it over the smaller of its volume and the rest's). Per class of each scan (its cached
`embeddings/neighbours.npy`, the default scan's k_small neighbours), the lowest-conductance set of at least
`--min-fraction` and at most `--max-fraction` of the class is searched by sweep cuts along the leading eigenvectors of the normalised graph, in two
graphs: `union` (an edge where either end names the other) and `mutual` (where both do). Rows give its size,
conductance and, with the scan's poisons, how many of them it holds; a clean scan gives what natural classes reach.
Appends to OUT/closed_groups.jsonl and rewrites OUT/closed_groups.md. The search is the product's
(sanitize.closed_groups, knn_density's `closed_group_conductance` pass, union graph); this script reports both graphs
and each class's profile, to choose the pass's threshold and size range on tuning keys.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np

from sanitize.closed_groups import class_graph, closed_group, local_neighbours, set_conductance, size_range
from sanitize.density import knn

GRAPHS = ("union", "mutual")
PROFILE = (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5)  # class fractions at which the profile is reported


def class_lists(scan_dir: Path, labels: np.ndarray, class_size: int | None):
    """Per class: its members and their k-NN lists as positions among them: the scan's own lists, or, with
    `class_size`, lists recomputed (exact, same k) on the scan's features of a random subset of that many a class."""
    neighbours = np.load(scan_dir / "embeddings" / "neighbours.npy", mmap_mode="r", allow_pickle=False)
    if class_size is not None:
        features = np.load(scan_dir / "embeddings" / "features.npy", mmap_mode="r", allow_pickle=False)
    rng = np.random.default_rng(0)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if class_size is None:
            yield c, members, local_neighbours(neighbours, members, len(labels))
        elif len(members) >= class_size:
            members = np.sort(rng.choice(members, class_size, replace=False))
            _, nearest = knn(np.asarray(features[members], dtype=np.float32), neighbours.shape[1], kind="flat")
            yield c, members, nearest


def scan_rows(name: str, scan_dir: Path, labels: np.ndarray, poisons: np.ndarray | None, args) -> list[dict]:
    """One row per class and graph of one scan (with --class-size instead: per class subsampled to each size, union graph)."""
    truth = np.zeros(len(labels), dtype=bool)
    if poisons is not None:
        truth[poisons] = True
    rows = []
    for class_size in args.class_size or [None]:
        for c, members, local in class_lists(scan_dir, labels, class_size):
            sizes = size_range(len(members), args.min_fraction, args.max_fraction)
            for kind in GRAPHS if class_size is None else GRAPHS[:1]:
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
                        "subsampled": class_size is not None,
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
            f"| {r['scan']} | {r['class']} | {r['graph']} | {r['n']}{' (a random subset)' if r.get('subsampled') else ''} "
            f"| {r['poisons_in_class']} | {'-' if r.get('poisons_conductance') is None else format(r['poisons_conductance'], '.3f')} "
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
        if (r["scan"], r["class"], r["graph"], r["n"]) in seen or r.get("subsampled"):
            continue
        seen.add((r["scan"], r["class"], r["graph"], r["n"]))
        cells = " | ".join(f"{r['profile'][f'{f:g}']:.3f}" for f in PROFILE)
        lines.append(f"| {r['scan']} | {r['class']} | {r['graph']} | {r['poisons_in_class']} | {cells} |")
    return "\n".join(lines) + "\n"


def scan_labels(scan_dir: Path, data: Path | None) -> np.ndarray:
    """The scanned examples' labels: the npz's y_train, or the scan's own scores.csv (its `label` column)."""
    if data is not None:
        with np.load(data, allow_pickle=False) as arrays:
            return arrays["y_train"].astype(np.int64)
    with (scan_dir / "scores.csv").open(newline="") as handle:
        return np.array([int(row["label"]) for row in csv.DictReader(handle)], dtype=np.int64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help="The npz the scans were of (its y_train labels); else each scan's scores.csv.",
    )
    parser.add_argument("--scan", action="append", required=True, help="NAME=SCAN_DIR[:POISONS.npz]")
    parser.add_argument("--min-fraction", type=float, default=0.01, help="The smallest group, a fraction of its class.")
    parser.add_argument("--max-fraction", type=float, default=0.5, help="The largest group, a fraction of its class.")
    parser.add_argument(
        "--class-size",
        type=int,
        action="append",
        default=[],
        help="Instead, every class subsampled to this many examples, k-NN recomputed on the scan's features (repeatable).",
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows_path = args.out / "closed_groups.jsonl"
    for text in args.scan:
        name, _, where = text.partition("=")
        scan_dir, _, poisons_path = where.partition(":")
        labels = scan_labels(Path(scan_dir), args.data)
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
