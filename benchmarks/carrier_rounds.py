"""Which round of robust training dropped a key's carriers and its other poisons, per defended victim.

    python benchmarks/carrier_rounds.py --results reports/gradient-matching-full --cache work-data/cache-full \
        --key 0 --seeds 0-3 --out reports/gradient-matching-full/carrier-rounds

For each `scan-robust` victim of the key (the incumbent robust training, `spread_cap=true` and the first round pooled
over four runs, `pool_runs=4`; each seed), reads the drop log its training left in the cache beside its weights and
counts, per round, the carriers (the poisons holding half of the attack's pull on the surrogate, attacks/carriers.py)
and the other poisons it dropped; for a pooled victim also what each scout's first round isolated. Victims whose
drop log is not in the cache (trained on another machine) are listed as such. Writes OUT/key<K>.json. Never trains
or scans: the poisons and the scan's kept set are read from the evaluation folder or the cache.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
from proxy_precision import evaluated_key_arguments, key_from_arguments  # run as a script: benchmarks/ is on the path
from run_record import write_results  # run as a script: benchmarks/ is on the path

from attacks.scales import EvaluationConfig
from sanitize.robust import scout_path

# --robust-option settings of the scan-robust arm
VARIANTS = {"incumbent": {}, "spread_cap": {"spread_cap": True}, "pooled": {"pool_runs": 4}}


def per_round(drop_log: dict, is_poison: np.ndarray, is_carrier: np.ndarray) -> dict:
    """{round: {"carriers": n, "other_poisons": m}} of one drop log (positions among the examples the scan kept, which
    the masks are over), rounds in order, those that dropped no poison left out."""
    by_round = {}
    for epoch in sorted({row["round"] for row in drop_log["dropped"]}):
        positions = [row["position"] for row in drop_log["dropped"] if row["round"] == epoch]
        carriers, poisons = int(is_carrier[positions].sum()), int(is_poison[positions].sum())
        if poisons:
            by_round[str(epoch)] = {"carriers": carriers, "other_poisons": poisons - carriers}
    return by_round


def scout_counts(path: Path, is_poison: np.ndarray, is_carrier: np.ndarray) -> dict[str, int]:
    """The examples, poisons and carriers a pooled victim's scout isolated in its first round."""
    with np.load(path, allow_pickle=False) as scout:
        isolated = scout["isolated"]
    return {
        "isolated": len(isolated),
        "poisons": int(is_poison[isolated].sum()),
        "carriers": int(is_carrier[isolated].sum()),
    }


def main() -> None:
    parser = evaluated_key_arguments(__doc__)
    parser.add_argument("--seeds", default="0-3", help="victim seeds, as FIRST-LAST")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    first, last = (int(part) for part in args.seeds.split("-"))

    key = key_from_arguments(args)
    is_poison, is_carrier = key.kept_masks()
    record: dict = {"key": args.key, "carriers": int(key.carriers.sum()), "poisons": len(key.carriers), "victims": []}
    for variant, options in VARIANTS.items():
        robust_config = EvaluationConfig(robust_options=options).robust_config()
        models = dataclasses.replace(key.harness.models, robust_config=robust_config)
        for seed in range(first, last + 1):
            weights = key.victim_weights(seed, models)
            log_path = weights.with_suffix(".drop_log.json")
            victim = {"variant": variant, "seed": seed, "drop_log": log_path.name}
            if not log_path.exists():
                record["victims"].append(victim | {"in_cache": False})
                continue
            log = json.loads(log_path.read_text())
            rounds = per_round(log, is_poison, is_carrier)
            victim |= {
                "in_cache": True,
                "finished": weights.exists(),
                "rounds": log["rounds"],
                "dropped": len(log["dropped"]),
                "by_round": rounds,
                "carriers_dropped": sum(counts["carriers"] for counts in rounds.values()),
                "other_poisons_dropped": sum(counts["other_poisons"] for counts in rounds.values()),
            }
            scouts = [scout_path(log_path, j) for j in range(1, log["config"].get("pool_runs", 1))]
            scouts = [path for path in scouts if path.exists()]
            if scouts:  # what each scout's first round isolated, before the vote and the cap
                victim["scouts_isolated"] = [scout_counts(path, is_poison, is_carrier) for path in scouts]
            record["victims"].append(victim)
    write_results(args.out / f"key{args.key}.json", record)


if __name__ == "__main__":
    main()
