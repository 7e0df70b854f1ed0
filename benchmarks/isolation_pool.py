"""How much robust training's first round catches per training seed, and what pooling the round over seeds would catch.

    python benchmarks/isolation_pool.py --results reports/gradient-matching-full-tuning-fp32 \
        --cache work-data/cache-full --key 104 --seeds 0-3 --work work-data/isolation-pool \
        --out reports/isolation-pool

For each seed, trains a model as the key's `scan-robust` victim would (the same recipe and seed, on what the default
scan kept, read from the evaluation folder or the cache) up to robust training's first round, and stores that round's
gradient proxy and EPIC's isolated set before the cap (WORK/key<K>-seed<S>.npz; a killed run resumes from its
checkpoint there). Then counts, per seed and for every vote threshold m of the seeds (an example isolated in at least
m of them), how many examples, poisons and carriers the round would drop, before the cap and after it (beyond the cap
the examples with the most votes go first, then those with the largest mean gradient proxy, the norm robust training
trims by). Writes OUT/key<K>.json. Never crafts or scans. A diagnostic for choosing robust training's next
candidate on tuning keys: nothing here is an evaluation result.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
from proxy_precision import EvaluatedKey, evaluated_key_arguments, key_from_arguments  # benchmarks/ is on the path
from run_record import write_results  # run as a script: benchmarks/ is on the path

from sanitize.embeddings import softmax_minus_onehot
from sanitize.medoids import isolated_medoids
from sanitize.robust import EpicDropper
from sanitize.training import milestone_epochs, predict, train_model


class FirstRoundScored(Exception):
    """Raised by the epoch hook once the first round's isolation is stored: the run stops there."""


def first_round(key: EvaluatedKey, seed: int, round_epoch: int, work: Path) -> dict[str, np.ndarray]:
    """The gradient proxy and isolated set (before the cap) of the round at `round_epoch` of a victim trained with
    `seed`."""
    stored = work / f"key{key.setup.key}-seed{seed}.npz"
    if not stored.exists():
        work.mkdir(parents=True, exist_ok=True)
        models, kept = key.harness.models, key.kept
        recipe = dataclasses.replace(models.recipe, seed=seed)

        def score_round(epoch, model, indices):
            if epoch + 1 < round_epoch:
                return indices
            logits = predict(model, kept, np.arange(len(kept)), models.device, models.amp)
            proxy = softmax_minus_onehot(logits, kept.labels)
            isolated, _ = isolated_medoids(proxy, kept.labels, kept.num_classes, models.robust_config.fraction)
            partial = stored.with_suffix(".partial.npz")
            np.savez(partial, proxy=proxy, isolated=isolated)
            partial.replace(stored)
            raise FirstRoundScored

        checkpoint = work / f"key{key.setup.key}-seed{seed}.partial.pt"
        try:
            train_model(
                models.new_model(seed),
                kept,
                np.arange(len(kept)),
                recipe,
                models.device,
                models.amp,
                checkpoint=checkpoint,
                meta={"key": str(key.setup.key), "seed": str(seed)},
                progress=False,
                after_epoch=score_round,
            )
        except FirstRoundScored:
            checkpoint.unlink(missing_ok=True)
    with np.load(stored, allow_pickle=False) as arrays:
        return {name: arrays[name] for name in arrays.files}


def dropper_for(key: EvaluatedKey, work: Path) -> EpicDropper:
    """Robust training's dropper for the key's kept set (its rounds and cap; its log is never written here)."""
    models = key.harness.models
    log = work / "unused.drop_log.json"
    last = max(milestone_epochs(models.recipe))
    return EpicDropper(key.kept, models.robust_config, models.recipe.epochs, last, log, models.device, models.amp)


def capped(positions: np.ndarray, score: np.ndarray, cap: int) -> np.ndarray:
    """`positions` trimmed to `cap`, the largest `score` first (robust training's trimming; stable on ties)."""
    if len(positions) <= cap:
        return positions
    return np.sort(positions[np.argsort(-score[positions], kind="stable")[:cap]])


def counted(positions: np.ndarray, is_poison: np.ndarray, is_carrier: np.ndarray) -> dict[str, int]:
    return {
        "dropped": len(positions),
        "poisons": int(is_poison[positions].sum()),
        "carriers": int(is_carrier[positions].sum()),
    }


def victim_round(key: EvaluatedKey, seed: int, round_epoch: int) -> np.ndarray | None:
    """The round's drops of the key's incumbent `scan-robust` victim with `seed`, from its drop log if cached."""
    log_path = key.victim_weights(seed).with_suffix(".drop_log.json")
    if not log_path.exists():
        return None
    rows = json.loads(log_path.read_text())["dropped"]
    return np.array(sorted(row["position"] for row in rows if row["round"] == round_epoch), dtype=np.int64)


def main() -> None:
    parser = evaluated_key_arguments(__doc__)
    parser.add_argument("--seeds", default="0-3", help="training seeds, as FIRST-LAST")
    parser.add_argument("--work", type=Path, required=True, help="where each seed's checkpoint and round are kept")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    first, last = (int(part) for part in args.seeds.split("-"))

    key = key_from_arguments(args)
    is_poison, is_carrier = key.kept_masks()
    dropper = dropper_for(key, args.work)
    cap, round_epoch = dropper.cap, dropper.rounds[0]

    seeds = list(range(first, last + 1))
    rounds = {seed: first_round(key, seed, round_epoch, args.work) for seed in seeds}
    votes = np.zeros(len(key.kept), dtype=np.int64)
    mean_norm = np.zeros(len(key.kept))
    per_seed = []
    for seed, scored in rounds.items():
        isolated, norm = scored["isolated"], np.linalg.norm(scored["proxy"], axis=1)
        votes[isolated] += 1
        mean_norm += norm / len(rounds)
        row = {
            "seed": seed,
            "isolated": counted(isolated, is_poison, is_carrier),
            "after_cap": counted(capped(isolated, norm, cap), is_poison, is_carrier),
        }
        logged = victim_round(key, seed, round_epoch)
        if logged is not None:  # the victim trained this seed: its own round must be the one recomputed here
            row["matches_victim_round"] = bool(np.array_equal(logged, capped(isolated, norm, cap)))
        per_seed.append(row)
    pooled = []
    for threshold in range(1, len(seeds) + 1):
        chosen = np.flatnonzero(votes >= threshold)
        pooled.append(
            {
                "isolated_in_at_least": threshold,
                "before_cap": counted(chosen, is_poison, is_carrier),
                # beyond the cap: the most votes first, then the largest mean gradient proxy (a proxy's norm is < 2)
                "after_cap": counted(capped(chosen, 2 * votes + mean_norm, cap), is_poison, is_carrier),
            }
        )
    record = {
        "key": args.key,
        "seeds": seeds,
        "round_epoch": round_epoch,
        "kept": len(key.kept),
        "cap": cap,
        "poisons_kept": int(is_poison.sum()),
        "carriers_kept": int(is_carrier.sum()),
        "carriers": int(key.carriers.sum()),
        "per_seed": per_seed,
        "pooled": pooled,
    }
    write_results(args.out / f"key{args.key}.json", record)


if __name__ == "__main__":
    main()
