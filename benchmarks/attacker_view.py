"""How clumped a key's poisons are in the attacker's own surrogate, beside the defender's proxy (the detection sweep).

    python benchmarks/attacker_view.py --cache work-data/cache-full --scale full --keys 0 [--attack NAME] \
        [--craft-option NAME=VALUE ...] --results reports/EVALUATION --sweep reports/.../detection.jsonl \
        [--proxy LABEL=SCAN/proxy/model.pt ...] --label NAME --out reports/...

An adaptive term (attacks.adaptive) acts on the surrogate's features; the scan sees the features of its own proxy,
trained on the poisoned set. Where a term fails against the scan, this tells whether it failed already in the space
it acted on or did not transfer to the defender's. In the surrogate's penultimate features of the intended class
(clean members and poisons), as the sweep does in the proxy's: the mean share of poisons among a poison's 10 nearest
neighbours (and a clean member's), the conductance of the poisons' own set in the union 10-NN graph and the
conductance of the class's most closed set of 1-20% (sanitize.closed_groups, as the default scan searches it). The
defender's side is read from the sweep's row of today's default for the same key and poisons. `--proxy` adds the space
of another scan's proxy (its weights), e.g. one trained on the clean data: whether the defender's proxy groups the
poisons because of its architecture or because it trained on them. `--victim` adds the space of a model of the
evaluation's own architecture (e.g. an undefended victim, a ResNet trained on the poisoned set): whether the grouping
survives a change of architecture in a model that trained on the poisons. Appends one JSON line per (label, key) to
OUT/attacker_view.jsonl and rewrites OUT/attacker_view.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from detection_sweep import (
    CURRENT,
    keys_harness,
    poisoned_keys,
    share_summary,
)  # run as a script: benchmarks/ is on the path

from attacks.base import surrogate_features
from attacks.experiment import Harness
from attacks.scales import GRADIENT_MATCHING
from sanitize.closed_groups import class_graph, closed_group, set_conductance, size_range
from sanitize.density import knn
from sanitize.detectors.knn_density import KnnDensityOptions
from sanitize.models import create_model, default_model_name, load_weights


def feature_space(model, harness: Harness, data, members: np.ndarray) -> np.ndarray:
    """A model's penultimate features of `members` of `data`."""
    model.to(harness.device).eval()
    parts = []
    with torch.no_grad():
        for start in range(0, len(members), 512):
            images = data.load_batch(members[start : start + 512])[0].float().div(255).to(harness.device)
            parts.append(surrogate_features(model, images, harness.amp).cpu().numpy())
    return np.concatenate(parts)


def scan_proxy(path: Path, data) -> torch.nn.Module:
    """A scan's proxy (the default architecture for the data) from its weights."""
    model = create_model(default_model_name(data.image_size), data.num_classes, (3, *data.image_size))
    load_weights(model, path)
    return model


def evaluation_model(path: Path, harness: Harness) -> torch.nn.Module:
    """A model of the evaluation's architecture (its victims' and surrogate's) from its weights (normalisation
    included: the weights carry it)."""
    model = harness.models.new_model(seed=0)
    load_weights(model, path)
    return model


def closure(space: np.ndarray, is_poison: np.ndarray) -> dict:
    """Neighbour shares and conductances of one class's poisons in `space` (rows: the class's members), from one
    k-NN search at the default scan's small scale."""
    options = KnnDensityOptions()
    _, neighbours = knn(space, options.k_small)
    graph = class_graph(neighbours)
    sizes = size_range(len(space), options.closed_group_min_fraction, options.closed_group_max_fraction)
    group = closed_group(graph, sizes)
    return {
        "poison_neighbour_share": share_summary(
            is_poison[neighbours].mean(axis=1), is_poison, np.ones(len(space), dtype=bool), options.k_small
        ),
        "poisons_conductance": set_conductance(graph, is_poison),
        "closed_group_conductance": group.conductance,
        "closed_group_size": int(len(group.members)),
        "closed_group_poisons": int(is_poison[group.members].sum()),
    }


def defender_view(sweep: Path | None, key: int, digest: str, intended: int) -> dict | None:
    """The neighbour share in the default scan's proxy (any swept knn_density row in its feature space) and the
    intended class's most closed set (a row of today's default, which searches it; None without one), if swept."""
    if sweep is None or not sweep.exists():
        return None
    rows = [
        r
        for r in map(json.loads, sweep.read_text().splitlines())
        if r["key"] == key and r.get("poisons_sha256") == digest and "poison_neighbour_share" in r
    ]
    in_features = [r for r in rows if r["options"].get("embedding", "features") == "features"]
    if not in_features:
        return None
    today = [r for r in in_features if r["options"] == CURRENT]
    closed = today[0]["closed_groups"].get(str(intended), {}) if today else {}
    return {"share": in_features[0]["poison_neighbour_share"], "conductance": closed.get("conductance")}


def render(rows: list[dict]) -> str:
    lines = [
        f"Poisons' neighbours that are poisons ({KnnDensityOptions().k_small} nearest in the intended class; clean members' in brackets), "
        "the poisons' own conductance and the class's most closed set of 1-20% (union graph; its size and the poisons "
        "in it), per space: the attacker's surrogate, other proxies given with --proxy, and the defender's proxy (the "
        "detection sweep's row of the default scan; '-' where it did not record it):",
        "",
        "| set | key | space | neighbour share | poisons' conductance | most closed set |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        for space, c in r["spaces"].items():
            share = c["poison_neighbour_share"]
            lines.append(
                f"| {r['label']} | {r['key']} | {space} | {share['poisons']:.2f} ({share['clean']:.3f}) "
                f"| {c['poisons_conductance']:.3f} | {c['closed_group_conductance']:.3f}, {c['closed_group_size']} "
                f"({c['closed_group_poisons']}) |"
            )
        if "defender" in r:
            d = r["defender"]
            conductance = "-" if d["conductance"] is None else f"{d['conductance']:.3f}"
            lines.append(
                f"| {r['label']} | {r['key']} | the defender's proxy | {d['share']['poisons']:.2f} "
                f"({d['share']['clean']:.3f}) | - | {conductance} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=Path("../shared"))
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--results", type=Path, required=True, help="The evaluation folder of the published poisons.")
    parser.add_argument("--sweep", type=Path, default=None, help="The detection sweep's detection.jsonl of the keys.")
    parser.add_argument("--label", required=True, help="The set's name in the table (its attack and options).")
    parser.add_argument("--keys", default="0")
    parser.add_argument("--eps", type=float, default=16.0)
    parser.add_argument("--attack", default=GRADIENT_MATCHING)
    parser.add_argument("--craft-option", action="append", default=[])
    parser.add_argument(
        "--proxy",
        action="append",
        default=[],
        help="LABEL=PATH: also the space of a scan proxy's weights (SCAN/proxy/model.pt), named LABEL.",
    )
    parser.add_argument(
        "--victim",
        action="append",
        default=[],
        help="LABEL=PATH: also the space of a model of the evaluation's architecture (e.g. a cached victim), named LABEL.",
    )
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--scale", default="full", choices=["cpu", "full"])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    harness = keys_harness(args, args.results, precision=args.precision)
    args.out.mkdir(parents=True, exist_ok=True)
    rows_path = args.out / "attacker_view.jsonl"
    (surrogate, *_), _ = harness.surrogates()
    spaces = (
        {"the attacker's surrogate": surrogate}
        | {label: scan_proxy(Path(path), harness.train) for label, path in (text.split("=", 1) for text in args.proxy)}
        | {label: evaluation_model(Path(path), harness) for label, path in (text.split("=", 1) for text in args.victim)}
    )
    for key, setup, poisons, poisoned in poisoned_keys(harness, args.keys):
        members = np.flatnonzero(poisoned.labels == setup.intended_class)
        is_poison = np.isin(members, setup.poison_indices)
        row = {
            "label": args.label,
            "key": key,
            "poisons_sha256": poisons.digest(),
            "spaces": {
                label: closure(feature_space(model, harness, poisoned, members), is_poison)
                for label, model in spaces.items()
            },
        }
        defender = defender_view(args.sweep, key, poisons.digest(), setup.intended_class)
        if defender is not None:
            row["defender"] = defender
        print(json.dumps(row))
        with rows_path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
    rows = [json.loads(line) for line in rows_path.read_text().splitlines()]
    (args.out / "attacker_view.md").write_text(render(rows))


if __name__ == "__main__":
    main()
