"""`sanitize finetune`: fine-tune a pretrained network on DATA, the transfer learner feature-collision poisons aim at,
with `robust` EPIC's rounds as it goes (and `exclude`, a scan's flagged.txt, left out first).

The recipe is the Bullseye Polytope reference's (ucsb-seclab/BullseyePoison): 60 epochs at batch 64 with Adam, the rate
x0.1 at epochs 30 and 45, the network in eval mode (batch norm statistics frozen), no augmentation, from the pretrained
head. *Linear* fine-tuning retrains the last layer on features computed once (rate 0.1, no weight decay; an N x D
feature array, which fine-tuning sets afford); *end-to-end* every weight (rate 1e-4, weight decay 5e-4). Robust
fine-tuning runs the product's EPIC dropper (sanitize.robust, its defaults) after every epoch of the first quarter, as
EPIC's reference (YuYang0901/EPIC) does in transfer: every epoch from 1, none from epoch 10 of 40.

`sanitize scan DATA --checkpoint W --held-out-checkpoint` then `sanitize finetune DATA --checkpoint W --robust
--exclude SCAN/flagged.txt` is the defence chosen for the transfer setting (reports/feature-collision). Outputs under
`out` (never inside DATA): model.pt (a state dict), summary.json and, when robust, drop_log.json and kept.txt. A run
is minutes on a fine-tuning set; a killed one starts again from the pretrained weights.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from sanitize.config import FINETUNE_MODES, FineTuneConfig, RobustConfig, route_options
from sanitize.data import claimed_output, excluding, open_dataset, prepare_output, removed_if_left_empty
from sanitize.data.base import ImageDataset
from sanitize.distributed import current_world
from sanitize.errors import SanitizeError
from sanitize.models import Classifier, create_model, load_weights, resolve_model_name
from sanitize.robust import EpicDropper
from sanitize.trainer import TrainResult, data_record, eval_accuracy
from sanitize.training import autocast, resolve_device, resolve_precision, save_atomic

ROBUST_ROUNDS = RobustConfig(every=1)  # EPIC's transfer recipe: a round after every epoch, the product's other defaults
ROBUST_STOP = 10 / 40  # ... and none from this share of the epochs on (EPIC's reference: epoch 10 of 40)


@dataclass(frozen=True)
class FineTune:
    """A fine-tuning recipe; a rate or weight decay left None takes the reference's for the mode."""

    mode: str = "linear"
    epochs: int = 60
    batch_size: int = 64
    lr: float | None = None
    weight_decay: float | None = None
    milestones: tuple[float, ...] = (0.5, 0.75)  # fractions of the epochs where the rate drops x0.1

    def __post_init__(self) -> None:
        if self.mode not in FINETUNE_MODES:
            raise SanitizeError(f"fine-tuning mode must be one of {FINETUNE_MODES}, not {self.mode!r}")

    @property
    def rate(self) -> float:
        return self.lr if self.lr is not None else (0.1 if self.mode == "linear" else 1e-4)

    @property
    def decay(self) -> float:
        return self.weight_decay if self.weight_decay is not None else (0.0 if self.mode == "linear" else 5e-4)


def robust_dropper(
    data: ImageDataset, recipe: FineTune, log_path: Path, device: torch.device, amp: torch.dtype | None
) -> EpicDropper:
    """EPIC's dropper for fine-tuning: a round after every epoch until the first quarter of `recipe`'s epochs."""
    last_round = math.ceil(recipe.epochs * ROBUST_STOP) - 1
    return EpicDropper(data, ROBUST_ROUNDS, recipe.epochs, last_round, log_path, device, amp)


def fine_tune(
    pretrained: Classifier,
    data: ImageDataset,
    recipe: FineTune,
    seed: int,
    device: torch.device,
    amp: torch.dtype | None,
    after_epoch: Callable[[int, torch.nn.Module, np.ndarray], np.ndarray] | None = None,
) -> Classifier:
    """A copy of `pretrained` (with its head) fine-tuned on `data`, its batch order drawn from `seed`. Linear
    fine-tuning trains the head on features computed once; end-to-end everything. `after_epoch(epoch, model,
    positions)` returns the positions the next epoch trains on (robust fine-tuning's drops)."""
    model = copy.deepcopy(pretrained).to(device).eval()
    generator = torch.Generator().manual_seed(seed)
    labels = torch.from_numpy(data.labels).long().to(device)
    linear = recipe.mode == "linear"
    model.requires_grad_(not linear)
    model.head.requires_grad_(True)
    inputs = _features(model, data, device, amp) if linear else None
    trainable = model.head.parameters() if linear else model.parameters()
    optimizer = torch.optim.Adam(trainable, lr=recipe.rate, weight_decay=recipe.decay)
    drops = {round(recipe.epochs * f) for f in recipe.milestones}
    survivors = np.arange(len(data))
    for epoch in range(recipe.epochs):
        if epoch in drops:
            for group in optimizer.param_groups:
                group["lr"] *= 0.1
        order = torch.from_numpy(survivors)[torch.randperm(len(survivors), generator=generator)]
        for start in range(0, len(order), recipe.batch_size):
            batch = order[start : start + recipe.batch_size]
            if linear:
                logits = model.head(inputs[batch.to(device)])
            else:
                images = data.load_batch(batch.numpy())[0].float().div(255).to(device)
                with autocast(device, amp):
                    logits = model(images).float()
            loss = F.cross_entropy(logits, labels[batch.to(device)])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if after_epoch is not None:
            survivors = after_epoch(epoch, model, survivors)
    return model.eval()


@torch.no_grad()
def _features(model: Classifier, data: ImageDataset, device: torch.device, amp: torch.dtype | None) -> torch.Tensor:
    parts = []
    for start in range(0, len(data), 256):
        images = data.load_batch(np.arange(start, min(len(data), start + 256)))[0].float().div(255).to(device)
        with autocast(device, amp):
            parts.append(model.features(images).float())
    return torch.cat(parts)


def run_finetune(data: str | os.PathLike, out: str | os.PathLike, config: FineTuneConfig) -> TrainResult:
    data, out = prepare_output(data, out)
    started = time.perf_counter()
    whole = open_dataset(data, image_size=config.image_size, progress=not config.quiet)
    dataset, excluded = excluding(whole, Path(config.exclude)) if config.exclude else (whole, None)
    device = resolve_device(config.device)
    amp = resolve_precision(config.precision, device)
    name = resolve_model_name(config.model, dataset.image_size)
    pretrained = create_model(name, dataset.num_classes, (3, *dataset.image_size))
    load_weights(pretrained, Path(config.checkpoint))
    recipe = FineTune(config.mode, config.epochs, config.batch_size, config.lr, config.weight_decay)
    files = {"model": out / "model.pt", "summary": out / "summary.json"}
    dropper = None
    if config.robust:
        files |= {"drop_log": out / "drop_log.json", "kept": out / "kept.txt"}
        files["drop_log"].unlink(missing_ok=True)  # a killed run starts again: its drops are not this run's
        dropper = robust_dropper(dataset, recipe, files["drop_log"], device, amp)
    model = fine_tune(pretrained, dataset, recipe, config.seed, device, amp, dropper)
    save_atomic(model.state_dict(), files["model"])
    dropped = dropper.dropped() if dropper else np.zeros(0, np.int64)
    if dropper:
        kept = np.setdiff1d(np.arange(len(dataset)), dropped)
        files["kept"].write_text("".join(dataset.ids[i] + "\n" for i in kept))
    summary = {
        "kind": "robust-finetune" if config.robust else "finetune",
        "data": data_record(whole, dataset),
        "excluded": excluded | {"trained_fingerprint": dataset.fingerprint} if excluded else None,
        "config": dataclasses.asdict(config),
        "model": {"name": name, "checkpoint": str(config.checkpoint), "recipe": dataclasses.asdict(recipe)},
        "train_accuracy": eval_accuracy(model, dataset, device, amp),
        "robust": {
            "rounds": dropper.rounds,
            "dropped": int(len(dropped)),
            "dropped_fraction": len(dropped) / len(dataset),
        }
        if dropper
        else None,
        "seconds": round(time.perf_counter() - started, 2),
    }
    if config.test:
        test = open_dataset(Path(config.test), image_size=dataset.image_size[0], progress=False)
        summary["test_accuracy"] = eval_accuracy(model, test, device, amp)
    files["summary"].write_text(json.dumps(summary, indent=1, default=str))
    return TrainResult(model, summary, [dataset.ids[i] for i in dropped], files)


def finetune(data: str | os.PathLike, out: str | os.PathLike = "sanitize-finetune", **options: Any) -> TrainResult:
    """Fine-tune the network in `checkpoint` on DATA; `robust=True` for EPIC's rounds; options are FineTuneConfig's."""
    config = route_options(FineTuneConfig, options, {})
    if current_world().world_size > 1:
        raise SanitizeError("sanitize finetune runs in one process: start it without torchrun")
    with removed_if_left_empty(out), claimed_output(data, out):
        return run_finetune(data, out, config)
