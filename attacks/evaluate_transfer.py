"""The evaluation in the transfer setting (attacks.transfer.TransferSetting: the extractor, the split, the poisons
crafted against the extractor, the victims): victims fine-tuned on the fine-tuning set with and without the poisons,
and on what `sanitize scan` keeps of the poisoned set (SCAN_ARMS); one JSON line each in OUT/results.jsonl, in the
from-scratch evaluation's row format, so that attacks.summary aggregates them (the row's `scale` names the setting:
transfer-linear or transfer-end-to-end). A killed run resumes: rows already written are skipped, the extractor and
the poisons load from the cache.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from attacks.arms import (
    DETECTOR_ARMS,
    UNPOISONED_ARMS,
    poison_truth,
    scan_share,
    scan_then_robust_removed,
    told_count,
)
from attacks.base import PoisonSet, PoisonSetup
from attacks.experiment import arm_data
from attacks.rows import read_rows, recorded_scan_options, run_record
from attacks.summary import aggregate
from attacks.transfer import TransferConfig, TransferSetting
from sanitize.data.arrays import ArrayDataset
from sanitize.errors import SanitizeError
from sanitize.manifest import flag_metrics
from sanitize.names import MODELS
from sanitize.scanner import scan

# the scan's two proxies here: one trained on the fine-tuning data (the default scan), or the victims' own pretrained
# extractor given as --checkpoint (what a defender who fine-tunes it holds); and Deep k-NN (the defense its paper
# measured on feature collision in transfer) on the extractor, told the poison count as in the from-scratch arms;
# scan-held-out-extractor tells the scan the extractor never saw the fine-tuning set (--held-out-checkpoint), so its
# label check runs on the extractor's predictions
SCAN_ARMS = ("scan", "scan-extractor", "scan-held-out-extractor", "deep_knn-extractor")
# victims that drop isolated examples as they fine-tune (`sanitize finetune --robust`), on the poisoned set or on
# what a scan arm kept of it
ROBUST_ARMS = {"robust": None, "scan-held-out-robust": "scan-held-out-extractor"}
TRANSFER_ARMS = ("clean", "undefended", "random-noise", *SCAN_ARMS, *ROBUST_ARMS)


def run_transfer_evaluation(
    train_path: str | Path, test_path: str | Path, out: str | Path, config: TransferConfig, command: str | None = None
) -> Path:
    """Fine-tune and measure every (key, arm, victim) not yet in OUT/results.jsonl; then aggregate."""
    unknown = set(config.arms) - set(TRANSFER_ARMS)
    if unknown:
        raise SanitizeError(f"unknown transfer arm(s) {', '.join(sorted(unknown))}; choose from {TRANSFER_ARMS}")
    unknown = set(config.substitutes) - set(MODELS)
    if unknown:
        raise SanitizeError(f"unknown substitute architecture(s) {', '.join(sorted(unknown))}; choose from {MODELS}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    world = TransferSetting(train_path, test_path, config, Path(config.cache) if config.cache else out / "cache", out)
    finetune, options = world.finetune, world.options
    setting = f"transfer-{config.mode}"
    done = _done(out)
    crafted_with = _options_key(dataclasses.asdict(options))
    for key in config.keys:
        setup = world.setup(key)
        poisons: PoisonSet | None = None
        for arm in config.arms:
            for seed in range(config.victims):
                poisoned = arm not in UNPOISONED_ARMS  # the controls have no poisons
                crafted_against = config.substitutes if poisoned else ()
                crafting = crafted_with if poisoned else None
                if poisoned:  # from the cache or OUT/poisons; crafted again only where both are gone
                    poisons = poisons or world.poisons(setup)
                digest = poisons.digest() if poisoned else None
                if (setting, config.attack, config.eps, key, arm, seed, crafted_against, crafting, digest) in done:
                    continue
                data = arm_data(finetune, arm, poisons, setup, config.eps)
                defense = {"dropped_fraction": 0.0, "poison_precision": None, "poison_recall": None, "auroc": None}
                scan_seconds = None
                caught = np.zeros(len(data), dtype=bool)
                scan_arm = arm if arm in SCAN_ARMS else ROBUST_ARMS.get(arm)
                if scan_arm is not None:
                    checkpoint = world.extractor_path if scan_arm.endswith("-extractor") else None
                    held_out = scan_arm == "scan-held-out-extractor"
                    detector = DETECTOR_ARMS[scan_arm.removesuffix("-extractor").removesuffix("-held-out")]
                    caught, defense, scan_seconds = _scanned(
                        data, setup, world.cache, checkpoint, detector, config, held_out
                    )
                drop_log = None
                if arm in ROBUST_ARMS:
                    drop_log = world.cache / "robust" / f"{arm}-{data.fingerprint[:16]}-seed{seed}.drop_log.json"
                    drop_log.parent.mkdir(parents=True, exist_ok=True)
                data = data.subset(np.flatnonzero(~caught)) if caught.any() else data
                started = time.perf_counter()
                victim = world.victim(data, seed, drop_log)
                seconds = round(time.perf_counter() - started, 2)
                if drop_log is not None:  # what robust training dropped, added to what the scan flagged
                    removed = scan_then_robust_removed(caught, drop_log)
                    scanned = scan_share(defense) if scan_arm else {}
                    defense |= flag_metrics(removed, None, poison_truth(setup, len(removed))) | scanned
                measured = world.measure(victim, setup)
                row = {
                    "attack": config.attack,
                    "scale": setting,
                    "eps": config.eps,
                    "budget": config.poisons / len(finetune),
                    "poison_key": key,
                    "target_id": setup.target_id,
                    "target_class": setup.target_class,
                    "intended_class": setup.intended_class,
                    "arm": arm,
                    "victim_seed": seed,
                    "success": measured["target_pred"] == setup.intended_class,
                    **measured,
                    **defense,
                    "poisons_sha256": digest,
                    "model": config.extractor,
                    "train_size": len(finetune),
                    "epochs": world.recipe.epochs,
                    "craft_config": dataclasses.asdict(options) if poisoned else None,
                    **({"substitutes": list(crafted_against)} if crafted_against else {}),
                    "seconds": {
                        "victim_training": seconds,
                        "crafting": poisons.metadata.get("seconds") if poisoned else None,
                        "scan": scan_seconds,
                    },
                    "run": run_record(world.device, world.amp),
                }
                with (out / "results.jsonl").open("a") as handle:
                    handle.write(json.dumps(row) + "\n")
                aggregate(out, command)
    if (out / "results.jsonl").exists():
        aggregate(out, command)
    return out


def _options_key(options: dict | None) -> str | None:
    """Crafting options as one comparable string (None for the controls' rows, which have no poisons)."""
    return None if options is None else json.dumps(options, sort_keys=True)


def _done(out: Path) -> set[tuple]:
    """The victims OUT has rows for, each named with its poisons' crafting options and digest: a run with other
    options (an `--craft-option`), or whose poisons were crafted again (against an extractor pretrained again, where
    the first poisons are gone), trains its poisoned arms again instead of counting other poisons' rows as its own."""
    if not (out / "results.jsonl").exists():
        return set()
    return {
        (
            r["scale"],
            r["attack"],
            r["eps"],
            r["poison_key"],
            r["arm"],
            r["victim_seed"],
            tuple(r.get("substitutes", ())),
            _options_key(r.get("craft_config")),
            r.get("poisons_sha256"),
        )
        for r in read_rows(out)
    }


def _scanned(
    data: ArrayDataset,
    setup: PoisonSetup,
    cache: Path,
    checkpoint: Path | None,
    detector: str,
    config: TransferConfig,
    held_out: bool = False,
) -> tuple[np.ndarray, dict[str, Any], float]:
    """What `sanitize scan` with `detector` flags in the poisoned fine-tuning set (with `checkpoint` as its proxy,
    `held_out` if the scan is told it never saw the set, or one it trains on the data): the flags, scored against the
    true poisons, and its wall seconds. Cached per poisoned set, proxy and detector."""
    options = {"quiet": True, "device": config.device, "precision": config.precision, "detector": detector}
    options |= {"expected_poisons": told_count(detector, setup)}
    if checkpoint is not None:
        options |= {"checkpoint": str(checkpoint), "model": config.extractor, "held_out_checkpoint": held_out}
    proxy = ("extractor-held-out" if held_out else "extractor") if checkpoint else "trained"
    name = (
        f"{proxy}-{data.fingerprint[:16]}"
        if detector == "knn_density"
        else f"{proxy}-{detector}-{data.fingerprint[:16]}"
    )
    out = cache / "scans" / name
    started = time.perf_counter()
    result = scan(data, out, **options)
    metrics = flag_metrics(result.flags, result.scores, poison_truth(setup, len(result.flags)))
    metrics["scan_options"] = recorded_scan_options(result.summary["config"])
    return result.flags, metrics, round(time.perf_counter() - started, 2)
