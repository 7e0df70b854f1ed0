"""The default rule on several proxies at once: the set fails if any proxy's gate fails, and the union of their flags
is what a victim would not train on (reports/adaptive-attack, candidate 3). Each proxy keeps its own closed-group
threshold.

    python benchmarks/both_gates.py --cache work-data/cache-full --scale full --keys 0,4 [--attack NAME] \
        [--craft-option NAME=VALUE ...] [--results reports/EVALUATION] \
        --proxy convnet=0.105 --proxy resnet18_cifar_w16=0.07 --out reports/...

Each proxy's scan of a key's poisoned set is the detection sweep's (benchmarks/detection_sweep.py: the same folders,
trained there when missing); the default scan's is the evaluation's published outcome where there is one. Appends one JSON line per (key, poisons, proxies and thresholds) to OUT/both_gates.jsonl
and rewrites OUT/both_gates.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from detection_sweep import (  # run as a script: benchmarks/ is on the path
    CURRENT,
    Proxy,
    caught_by_pull,
    keys_harness,
    poison_pulls,
    poisoned_keys,
    proxy_changes,
    proxy_scan_dir,
    variant_config,
)

from attacks.arms import poison_truth
from attacks.carriers import pull_carriers
from attacks.experiment import current_outcome
from sanitize.config import ScanConfig
from sanitize.detectors import run_detector
from sanitize.embeddings import load_embeddings
from sanitize.manifest import flag_metrics
from sanitize.models import resolve_model_name
from sanitize.scanner import gate


def parse_proxy(text: str) -> tuple[str, float]:
    """MODEL=THRESHOLD: a proxy of the registry and its closed-group conductance threshold."""
    model, _, threshold = text.partition("=")
    if not threshold:
        raise argparse.ArgumentTypeError(f"expected MODEL=THRESHOLD, got {text!r}")
    return model, float(threshold)


def gate_of(flags: np.ndarray, per_class: dict, config: ScanConfig) -> dict:
    """One proxy's verdict by the scan's own gate (too many flags or an alarmed class), and each class's most closed
    set."""
    alarmed = [c for c, info in per_class.items() if info.get("alarmed")]
    flagged = float(flags.mean())
    failed = gate(flagged, alarmed, config)["verdict"] == "failed"
    closed = {
        c: [info["closed_group"].get("size"), info["closed_group"]["conductance"]]
        for c, info in per_class.items()
        if "conductance" in info.get("closed_group", {})
    }
    return {"failed": failed, "flagged": flagged, "alarmed_classes": alarmed, "closed_groups": closed}


def proxy_outcome(harness, poisoned, name: str, config: ScanConfig) -> tuple[np.ndarray, np.ndarray, dict]:
    """(flags, scores, per-class records) of the rule `config` on one proxy: the evaluation's published outcome of
    the default scan where that is the scan asked for (its proxy is not trained again), else the rule run on the
    proxy's embeddings (the detection sweep's folder, trained when missing)."""
    defaults = ScanConfig()
    proxy = Proxy(name, defaults.train.epochs, None, defaults.train.schedule, None, defaults.seed)
    if not proxy_changes(poisoned, proxy) and config.options == defaults.options:
        published = harness.published_scan_path(harness.scan_dir(poisoned) / "knn_density")
        stored = current_outcome(published, poisoned, {})
        if stored is not None:
            result = stored[0]
            return result.flags, result.scores, by_index(result.summary["detector"]["per_class"], poisoned.classes)
    embeddings = load_embeddings(proxy_scan_dir(harness, poisoned, proxy) / "embeddings", poisoned.labels)
    detection = run_detector("knn_density", embeddings, config.options, config.context(False))
    return detection.flags, detection.scores, detection.summary["per_class"]


def by_index(per_class: dict, classes: list[str]) -> dict:
    """A scan summary's per-class records (keyed by class name) keyed by class index, as the detector's are."""
    return {str(classes.index(name)): info for name, info in per_class.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=Path("../shared"))
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--results", type=Path, default=None, help="The evaluation folder of the keys (its OUT).")
    parser.add_argument("--keys", default="0")
    parser.add_argument("--eps", type=float, default=16.0)
    parser.add_argument("--attack", default="gradient-matching")
    parser.add_argument("--craft-option", action="append", default=[], help="NAME=VALUE, as the evaluation's.")
    parser.add_argument("--scale", default="full", choices=["cpu", "full"])
    parser.add_argument("--proxy", type=parse_proxy, action="append", required=True, help="MODEL=THRESHOLD (repeat).")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    harness = keys_harness(args, args.results or args.cache)
    args.out.mkdir(parents=True, exist_ok=True)
    rows_path = args.out / "both_gates.jsonl"
    for key, setup, poisons, poisoned in poisoned_keys(harness, args.keys):
        truth = poison_truth(setup, len(poisoned))
        carriers = pull_carriers(pull := poison_pulls(harness, setup, poisoned))
        union = np.zeros(len(poisoned), dtype=bool)
        gates = {}
        for model, threshold in args.proxy:
            name = resolve_model_name(model, harness.train.image_size)
            config = variant_config("knn_density", CURRENT | {"closed_group_conductance": threshold})
            flags, scores, per_class = proxy_outcome(harness, poisoned, name, config)
            gates[f"{name}={threshold:g}"] = gate_of(flags, per_class, config) | {
                "poison_recall": flag_metrics(flags, None, truth)["poison_recall"],
                **caught_by_pull(flags, scores, pull, carriers, setup),
            }
            union |= flags
        caught = caught_by_pull(union, union.astype(float), pull, carriers, setup)
        row = {
            "key": key,
            "attack": args.attack,
            "craft_options": dict(sorted(harness.config.craft_options.items())),
            "poisons_sha256": poisons.digest(),
            "intended_class": setup.intended_class,
            "gates": gates,
            "failed": any(g["failed"] for g in gates.values()),
            **flag_metrics(union, None, truth),
            "carriers": caught["carriers"],
            "recall_carriers": caught["recall_carriers"],
        }
        with rows_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
    render(rows_path, args.out / "both_gates.md")


def render(rows_path: Path, out: Path) -> None:
    lines = [
        "| key | attack (poisons) | proxy=threshold: verdict, flagged, recall, carriers, intended class's closed set, "
        "lowest other | both: verdict | union flagged | union recall | union carriers |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in map(json.loads, rows_path.read_text().splitlines()):
        cells = []
        for name, g in r["gates"].items():
            intended = g["closed_groups"].get(str(r["intended_class"]))
            others = [v[1] for c, v in g["closed_groups"].items() if c != str(r["intended_class"])]
            cells.append(
                f"{name}: {'failed' if g['failed'] else 'passed'}, {g['flagged']:.2%}, {g['poison_recall']:.2f}, "
                f"{round(g['recall_carriers'] * g['carriers'])} of {g['carriers']}, "
                f"{'-' if intended is None else f'{intended[0]} at {intended[1]:.3f}'}, "
                f"{f'{min(others):.3f}' if others else '-'}"
            )
        lines.append(
            f"| {r['key']} | {r['attack']} ({r['poisons_sha256'][:6]}) | {'<br>'.join(cells)} "
            f"| {'failed' if r['failed'] else 'passed'} | {r['dropped_fraction']:.2%} | {r['poison_recall']:.2f} "
            f"| {round(r['recall_carriers'] * r['carriers'])} of {r['carriers']} |"
        )
    out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
