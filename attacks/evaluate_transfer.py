"""The evaluation in the transfer setting (attacks.transfer): one extractor pretrained on the pretraining split (cached),
poisons crafted against it (white-box: the victims' own extractor), victims fine-tuned on the fine-tuning set with and
without the poisons, and on what `sanitize scan` keeps of the poisoned set (SCAN_ARMS); one JSON line each in OUT/results.jsonl, in the from-scratch evaluation's row format, so that
attacks.summary aggregates them (the row's `scale` names the setting: transfer-linear or transfer-end-to-end).
A killed run resumes: rows already written are skipped, the extractor and the poisons load from the cache.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from attacks.arms import UNPOISONED_ARMS, poison_truth
from attacks.base import PoisonSet, PoisonSetup, choose_setup, load_poisons, save_poisons
from attacks.crafting import craft, options_identity
from attacks.experiment import arm_data, measure_victim
from attacks.registry import attack_options
from attacks.rows import read_rows, recorded_scan_options
from attacks.summary import aggregate
from attacks.trained import ModelCache, stable_hash
from attacks.transfer import FineTune, fine_tune, transfer_split
from sanitize.config import TrainConfig
from sanitize.data import open_dataset
from sanitize.data.arrays import ArrayDataset
from sanitize.errors import SanitizeError
from sanitize.manifest import flag_metrics
from sanitize.scanner import scan
from sanitize.training import channel_stats, resolve_device, resolve_precision

# the scan's two proxies here: one trained on the fine-tuning data (the default scan), or the victims' own pretrained
# extractor given as --checkpoint (what a defender who fine-tunes it holds)
SCAN_ARMS = ("scan", "scan-extractor")
TRANSFER_ARMS = ("clean", "undefended", "random-noise", *SCAN_ARMS)
EXTRACTOR_SEED = 0  # the victims' extractor; white-box attacks craft against this one


@dataclass
class TransferConfig:
    attack: str = "bullseye-polytope"
    mode: str = "linear"
    keys: tuple[int, ...] = tuple(range(8))
    victims: int = 2
    eps: float = 25.0  # the reference's 0.1 of the pixel range
    poisons: int = 5
    arms: tuple[str, ...] = TRANSFER_ARMS
    extractor: str = "resnet18_cifar_w16"
    extractor_epochs: int = 30  # the full scale's recipe (docs/protocol.md)
    pool_per_class: int = 200  # held out of pretraining (the reference's split) ...
    finetune_per_class: int = 50  # ... of which the fine-tuning set
    finetune_epochs: int = 60
    craft_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    device: str = "auto"
    precision: str = "auto"
    cache: str | None = None  # default OUT/cache


def run_transfer_evaluation(
    train_path: str | Path, test_path: str | Path, out: str | Path, config: TransferConfig, command: str | None = None
) -> Path:
    """Fine-tune and measure every (key, arm, victim) not yet in OUT/results.jsonl; then aggregate."""
    unknown = set(config.arms) - set(TRANSFER_ARMS)
    if unknown:
        raise SanitizeError(f"unknown transfer arm(s) {', '.join(sorted(unknown))}; choose from {TRANSFER_ARMS}")
    recipe = FineTune(config.mode, epochs=config.finetune_epochs)
    options = attack_options(config.attack, **config.craft_options)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(config.cache) if config.cache else out / "cache"
    device = resolve_device(config.device)
    amp = resolve_precision(config.precision, device)
    train, test = open_dataset(Path(train_path), progress=False), open_dataset(Path(test_path), progress=False)
    if not isinstance(train, ArrayDataset):
        raise SanitizeError("the transfer evaluation needs .npz training data")
    pretrain_positions, finetune_positions = transfer_split(train, config.pool_per_class, config.finetune_per_class)
    pretrain, finetune = train.subset(pretrain_positions), train.subset(finetune_positions)
    models = ModelCache(
        cache,
        config.extractor,
        {},
        TrainConfig(epochs=config.extractor_epochs),
        train.num_classes,
        train.image_size,
        *channel_stats(pretrain),
        device,
        amp,
        progress=False,
    )
    extractor, _ = models.trained(pretrain, EXTRACTOR_SEED, "extractor")
    extractor.to(device).eval()
    setting = f"transfer-{config.mode}"
    done = _done(out)
    for key in config.keys:
        setup = choose_setup(key, finetune, test, config.poisons / len(finetune))
        identity = [
            config.attack,
            config.eps,
            key,
            options_identity(options),
            models.path(pretrain, EXTRACTOR_SEED, "extractor").stem,
        ]
        path = cache / f"poisons-{config.attack}-transfer-key{key}-eps{config.eps:g}-{stable_hash(*identity)}.npz"
        poisons: PoisonSet | None = None
        for arm in config.arms:
            for seed in range(config.victims):
                if (setting, config.attack, config.eps, key, arm, seed) in done:
                    continue
                if arm not in UNPOISONED_ARMS:
                    poisons = poisons or _poisons(path, config, options, extractor, finetune, test, setup, device, amp)
                data = arm_data(finetune, arm, poisons, setup, config.eps)
                defense = {"dropped_fraction": 0.0, "poison_precision": None, "poison_recall": None, "auroc": None}
                scan_seconds = None
                if arm in SCAN_ARMS:
                    checkpoint = models.path(pretrain, EXTRACTOR_SEED, "extractor") if arm == "scan-extractor" else None
                    data, defense, scan_seconds = _scanned(data, setup, cache, checkpoint, config)
                started = time.perf_counter()
                victim = fine_tune(extractor, data, recipe, seed, device, amp)
                seconds = round(time.perf_counter() - started, 2)
                measured = measure_victim(victim, test, setup, device, amp)
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
                    "poisons_sha256": poisons.digest() if arm not in UNPOISONED_ARMS else None,
                    "model": config.extractor,
                    "train_size": len(finetune),
                    "epochs": recipe.epochs,
                    "craft_config": dataclasses.asdict(options) if arm not in UNPOISONED_ARMS else None,
                    "seconds": {
                        "victim_training": seconds,
                        "crafting": poisons.metadata.get("seconds") if arm not in UNPOISONED_ARMS else None,
                        "scan": scan_seconds,
                    },
                }
                with (out / "results.jsonl").open("a") as handle:
                    handle.write(json.dumps(row) + "\n")
                aggregate(out, command)
    if (out / "results.jsonl").exists():
        aggregate(out, command)
    return out


def _done(out: Path) -> set[tuple]:
    if not (out / "results.jsonl").exists():
        return set()
    return {(r["scale"], r["attack"], r["eps"], r["poison_key"], r["arm"], r["victim_seed"]) for r in read_rows(out)}


def _scanned(
    data: ArrayDataset, setup: PoisonSetup, cache: Path, checkpoint: Path | None, config: TransferConfig
) -> tuple[ArrayDataset, dict[str, Any], float]:
    """What `sanitize scan` keeps of the poisoned fine-tuning set (with `checkpoint` as its proxy, or one it trains on
    the data), its flags scored against the true poisons, and its wall seconds. Cached per poisoned set and proxy."""
    options = {"quiet": True, "device": config.device, "precision": config.precision}
    if checkpoint is not None:
        options |= {"checkpoint": str(checkpoint), "model": config.extractor}
    out = cache / "scans" / f"{'extractor' if checkpoint else 'trained'}-{data.fingerprint[:16]}"
    started = time.perf_counter()
    result = scan(data, out, **options)
    metrics = flag_metrics(result.flags, result.scores, poison_truth(setup, len(result.flags)))
    metrics["scan_options"] = recorded_scan_options(result.summary["config"])
    return data.subset(np.flatnonzero(~result.flags)), metrics, round(time.perf_counter() - started, 2)


def _poisons(path, config, options, extractor, finetune, test, setup, device, amp) -> PoisonSet:
    """The key's poisons from the cache, or crafted against the extractor and cached."""
    if path.exists():
        return load_poisons(path, setup)
    target = test.load_image(setup.target_index)
    poisons = craft(config.attack, [extractor], finetune, target, setup, config.eps, options, device, amp, False)
    save_poisons(poisons, path)
    return poisons
