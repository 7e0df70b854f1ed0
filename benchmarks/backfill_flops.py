"""Add model FLOPs (sanitize.work) to evaluation rows written before rows carried them.

    python benchmarks/backfill_flops.py --results reports/gradient-matching-full --cache work-data/cache-full

For each row without `flops`: a control arm's victim trained on as many examples as the clean set; for the others
it rebuilds that row's training data (the poisons from the cache, the cached scan's flags, the calibration arm's
drops) and counts what its victim trained on, from the recipe and, for robust training, the cached drop log, and what
its scan trained and scored (the cached scan's summary). This is the same count a new row gets. Nothing else in the row changes; then the summary is written again under its own command. Rows are left as
they are (and counted) when their poisons, scan or drop log are not cached, or when they were scanned under
another default. It never crafts or trains: run it while no evaluation appends to the same results.jsonl.
"""

from __future__ import annotations

from backfill_carriers import backfill_arguments, rewrite, row_harness

from attacks import choose_setup
from attacks.arms import CALIBRATION_ARMS, CONTROL_ARMS, ROBUST_ARMS, SCANNED_ARMS, UNPOISONED_ARMS
from attacks.evaluate import victim_tag
from attacks.experiment import Harness
from attacks.rows import defense_variant, read_rows


def main() -> None:
    args = backfill_arguments(__doc__)
    rows = list(read_rows(args.results))
    harnesses: dict[tuple, Harness] = {}
    added = 0
    for row in rows:
        if row.get("flops") is None:
            flops = row_flops(row_harness(row, args.data, args.results, args.cache, harnesses), row)
            if flops is not None:
                row["flops"] = flops
                added += 1
    rewrite(args.results, rows)
    print(f"FLOPs added to {added} rows; {sum(row.get('flops') is None for row in rows)} left without them")


def row_flops(harness: Harness, row: dict) -> dict[str, float] | None:
    """The row's {"scan": ..., "victim_training": ...} FLOPs as its evaluation would count them now, or None when
    what it was trained on cannot be rebuilt from the cache without training or crafting."""
    arm = row["arm"]
    if arm in CONTROL_ARMS:  # trained on as many examples as the clean set: nothing to rebuild
        return {"victim_training": harness.models.work(harness.train, row["victim_seed"], victim_tag(arm, True))}
    if defense_variant(row):
        return None
    setup = choose_setup(row["poison_key"], harness.train, harness.test, harness.config.budget)
    poisons = None if arm in UNPOISONED_ARMS else harness.stored_poisons(setup)
    if arm not in UNPOISONED_ARMS and (poisons is None or poisons.digest() != row["poisons_sha256"]):
        return None
    data = harness.data_for(arm, poisons, setup)
    poisoned = data.fingerprint
    flops = {}
    scanned = arm in SCANNED_ARMS or arm == "random-filter"
    if scanned and not (harness.scan_dir(data) / "knn_density" / "proxy" / "model.pt").exists():
        return None  # the scan is not cached: redoing it would train a proxy
    if arm in CALIBRATION_ARMS:
        data, _, _ = harness.calibration(data, arm, setup)
    if arm in SCANNED_ARMS:
        if SCANNED_ARMS[arm] != "knn_density" and not (harness.scan_dir(data) / SCANNED_ARMS[arm]).exists():
            return None
        data, _, _, cost = harness.filtered(data, arm, setup)
        flops["scan"] = cost.flops
    robust, tag = arm in ROBUST_ARMS, victim_tag(arm, data.fingerprint == poisoned)
    if robust and not harness.models.path(data, row["victim_seed"], tag, robust).with_suffix(".drop_log.json").exists():
        return None  # a plain victim's count needs only its data's size; a robust one's needs its drops
    return flops | {"victim_training": harness.models.work(data, row["victim_seed"], tag, robust)}


if __name__ == "__main__":
    main()
