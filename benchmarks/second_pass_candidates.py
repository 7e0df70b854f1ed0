"""Candidate second passes for an alarmed class, scored on real poisons without victims (../reports/detection-cpu).

    python benchmarks/second_pass_candidates.py --cache work-data/cache-cpu --sets 0:16,3:8 --out reports/detection-cpu/second_pass.md
        [--scale full] [--attack NAME --craft-option NAME=VALUE ...] [--results reports/EVALUATION]

For each cached poisoned set (its default scan and surrogate cached by the evaluation), inside the intended class:
how many clean examples and how many carriers each rule flags (besides the first pass): `hard`, every misassigned
example, hard + those sent to the class most misassigned examples go to, and hard + misassigned with the proxy's
probability of the other class >= 0.5 / 0.6. `hard` and `either` are also given as if the class were alarmed
whatever the count test says (the second pass applied to a class another pass alarms, such as the closed-group pass).
Also where the carriers' nearest neighbours lie (first-pass flags?).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
from detection_sweep import poison_pulls  # run as a script: benchmarks/ is on the path

from attacks import choose_setup
from attacks.carriers import pull_carriers
from attacks.experiment import Harness
from attacks.registry import parse_option
from attacks.scales import GRADIENT_MATCHING, EvaluationConfig
from sanitize.density import knn
from sanitize.detectors import run_detector
from sanitize.detectors.knn_density import KnnDensityOptions, hard_examples
from sanitize.embeddings import load_embeddings


def candidate_rows(harness: Harness, key: int) -> list[str]:
    setup = choose_setup(key, harness.train, harness.test, harness.config.budget)
    poisoned = harness.data_for("undefended", harness.stored_poisons(setup))
    embeddings = load_embeddings(harness.scan_dir(poisoned) / "knn_density" / "embeddings", poisoned.labels)
    carriers = np.asarray(setup.poison_indices)[pull_carriers(poison_pulls(harness, setup, poisoned))]
    members = np.flatnonzero(poisoned.labels == setup.intended_class)
    is_poison, is_carrier = np.isin(members, setup.poison_indices), np.isin(members, carriers)
    loss, predicted, confidence = (statistic[members] for statistic in embeddings.proxy_statistics())
    num_classes = embeddings.meta["num_classes"]
    misassigned = predicted != setup.intended_class

    def detect(**options):
        return run_detector("knn_density", embeddings, dataclasses.replace(KnnDensityOptions(), **options))

    first_pass = detect(class_alarm_p=0.0)
    first, hard = first_pass.flags[members], detect(alarm_rule="hard").flags[members]
    defaults = KnnDensityOptions()
    isolation = first_pass.arrays["isolation_z"][members]
    hard_if_alarmed = hard_examples(isolation, loss, defaults.alarm_z)
    sure_elsewhere = misassigned & (confidence >= defaults.alarm_confidence)
    dominant = np.bincount(predicted[misassigned], minlength=num_classes).argmax()
    rules = {
        "hard": hard,
        "every misassigned": misassigned,
        "either (any confidence)": hard | misassigned,
        f"hard + sent to the dominant class ({dominant})": hard | (predicted == dominant),
        "hard + misassigned, p >= 0.5": hard | (misassigned & (confidence >= 0.5)),
        "hard + misassigned, p >= 0.6": hard | (misassigned & (confidence >= 0.6)),
        "hard, as if alarmed": first | hard_if_alarmed,
        f"either (p >= {defaults.alarm_confidence:g}), as if alarmed": first | hard_if_alarmed | sure_elsewhere,
    }
    rows = [
        f"| {key} | {harness.config.eps:g} | {name} | {int((flags & ~first & ~is_poison).sum())} | {int((flags & is_carrier).sum())} of {int(is_carrier.sum())} |"
        for name, flags in rules.items()
    ]
    _, nearest = knn(np.ascontiguousarray(np.asarray(embeddings.features)[members], dtype=np.float32), 10, kind="flat")
    near_flags = first[nearest[is_carrier]].sum()
    carrier_classes = np.bincount(predicted[is_carrier & misassigned], minlength=num_classes)
    rows.append(
        f"| {key} | {harness.config.eps:g} | (carriers: misassigned to classes {np.flatnonzero(carrier_classes).tolist()}, "
        f"p of that class {[round(float(c), 2) for c in np.sort(confidence[is_carrier & misassigned])]}; first-pass flags among their 10 nearest: {int(near_flags)}) | - | - |"
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=Path("../shared"))
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--sets", default="0:16,3:8", help="key:eps pairs")
    parser.add_argument("--scale", default="cpu", choices=["cpu", "full"], help="The evaluation scale of the sets.")
    parser.add_argument("--attack", default=GRADIENT_MATCHING)
    parser.add_argument("--craft-option", action="append", default=[], help="NAME=VALUE, as the evaluation's.")
    parser.add_argument(
        "--results", type=Path, default=None, help="The evaluation folder holding the published poisons."
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    data = args.shared / "data" / "cifar10"
    lines = [
        "| key | eps | rule in the alarmed class | clean examples flagged beyond the first pass | carriers flagged |",
        "| --- | --- | --- | --- | --- |",
    ]
    for pair in args.sets.split(","):
        key, eps = pair.split(":")
        config = EvaluationConfig(
            attack=args.attack,
            scale=args.scale,
            eps=float(eps),
            craft_options=dict(parse_option(args.attack, text) for text in args.craft_option),
            cache=str(args.cache),
        )
        published = args.results or args.cache
        lines += candidate_rows(
            Harness(data / "cifar10_train.npz", data / "cifar10_test.npz", published, config, progress=False), int(key)
        )
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
