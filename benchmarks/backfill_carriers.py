"""Add the carrier split (attacks.evaluate.split_by_carriers) to defended rows written before rows carried it.

    python benchmarks/backfill_carriers.py --results reports/gradient-matching-cpu --cache work-data/cache-cpu

For each defended row without `carriers`, reads that row's own flags (the cached scan of its poisoned set, or the
robust victim's drop log) and the poisons' pulls on the cached surrogate, adds `carriers`, `carrier_recall` and
`rest_recall`, and changes nothing else; then re-aggregates with the summary's command. Rows whose poisons, scan or
drop log are not cached are left as they are (and counted). Never crafts or trains: run it while no evaluation
appends to the same results.jsonl.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from attacks import choose_setup
from attacks.arms import DETECTOR_ARMS, robust_dropped, split_by_carriers
from attacks.experiment import Harness
from attacks.rows import read_rows
from attacks.scales import SCALES, EvaluationConfig
from attacks.summary import aggregate
from attacks.surrogates import SURROGATE_SEED
from sanitize.data import write_atomic


def backfill_arguments(doc: str) -> argparse.Namespace:
    """A backfill's options: the evaluation folder, its cache, and the data."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--results", type=Path, required=True, help="an evaluation folder holding results.jsonl")
    parser.add_argument("--cache", type=Path, required=True, help="the evaluation's --cache")
    parser.add_argument("--data", type=Path, default=Path("../shared/data/cifar10"))
    return parser.parse_args()


def main() -> None:
    args = backfill_arguments(__doc__)
    rows = list(read_rows(args.results))
    harnesses: dict[tuple, Harness] = {}
    added = skipped = 0
    for row in rows:
        if "carriers" in row or not (row["arm"] in DETECTOR_ARMS or row["arm"] == "robust"):
            continue
        harness = row_harness(row, args.data, args.results, args.cache, harnesses)
        setup = choose_setup(row["poison_key"], harness.train, harness.test, harness.config.budget)
        surrogate_path = harness.models.path(harness.train, SURROGATE_SEED, "surrogate")
        if not (surrogate_path.exists() and harness.poisons_path(setup).exists()):
            skipped += 1
            continue
        surrogate, _ = harness.models.trained(harness.train, SURROGATE_SEED, "surrogate")
        data = harness.data_for(row["arm"], harness.poisons(setup, surrogate))
        carriers = harness.carriers(setup, data, surrogate)
        if row["arm"] == "robust":
            drop_log = harness.models.path(data, row["victim_seed"], "victim-robust", robust=True).with_suffix(
                ".drop_log.json"
            )
            if not drop_log.exists():
                skipped += 1
                continue
            split = split_by_carriers(robust_dropped(drop_log, len(data)), setup, carriers)
        else:
            if not (harness.scan_dir(data) / DETECTOR_ARMS[row["arm"]]).exists():
                skipped += 1
                continue
            _, caught, _, _ = harness.filtered(data, row["arm"], setup)
            split = split_by_carriers(caught, setup, carriers)
        row.update({name: split[name] for name in ("carriers", "carrier_recall", "rest_recall")})
        added += 1
    rewrite(args.results, rows)
    print(f"carrier split added to {added} rows; {skipped} left without it (nothing cached to read)")


def row_harness(row: dict, data: Path, results: Path, cache: Path, harnesses: dict[tuple, Harness]) -> Harness:
    """The harness that made `row` (its scale, model, epochs and eps; the budget of every evaluation so far, 1%),
    one per configuration."""
    model = None if row["model"] == SCALES[row["scale"]].model else row["model"]
    key = (row["scale"], model, row["epochs"], row["eps"])
    if key not in harnesses:
        config = EvaluationConfig(
            scale=row["scale"], model=model, epochs=row["epochs"], eps=float(row["eps"]), budget=0.01, cache=str(cache)
        )
        harnesses[key] = Harness(data / "cifar10_train.npz", data / "cifar10_test.npz", results, config, progress=False)
    return harnesses[key]


def rewrite(results: Path, rows: list[dict]) -> None:
    """results.jsonl with `rows`, then the summary again under its own command."""
    write_atomic(results / "results.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
    aggregate(results, json.loads((results / "summary.json").read_text()).get("command"))


if __name__ == "__main__":
    main()
