"""Out-of-fold predictions: K proxies, each trained on all but one fold of the data, predict the fold they never saw.

A proxy trained on the data fits its labels, wrong ones included, so its own predictions cannot say that an example's
label is wrong; a proxy that never saw the example can (cross-validated predicted probabilities, the input of
confident learning: Northcutt, Jiang & Chuang, JAIR 2021). Poisons that carry the attacker's labels (back-gradient
optimisation, label flips) are such examples. Folds are stratified by class and drawn from the scan's seed; each
fold's training resumes from its checkpoint and its logits are kept, so a killed scan loses at most one epoch.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from sanitize.config import TrainConfig
from sanitize.data import ImageDataset, write_atomic
from sanitize.distributed import World
from sanitize.training import predict, train_from_scratch


def fold_assignment(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Each example's fold in 0..folds-1: every class dealt round-robin over the folds in a seeded random order."""
    rng = np.random.default_rng([seed, folds])
    fold = np.empty(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        fold[rng.permutation(members)] = np.arange(len(members)) % folds
    return fold


def out_of_fold_logits(
    dataset: ImageDataset,
    model_name: str,
    recipe: TrainConfig,
    directory: Path,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    folds: int,
    seed: int = 0,
    workers: int = 0,
    batch_size: int = 512,
    progress: bool = True,
    world: World = World(),
) -> np.ndarray:
    """(N, C) float32 logits, row i from the proxy trained without example i's fold; kept in directory/."""
    fold = fold_assignment(dataset.labels, folds, seed)
    logits = np.zeros((len(dataset), dataset.num_classes), dtype=np.float32)
    for k in range(folds):
        held_out = np.flatnonzero(fold == k)
        done = directory / f"fold{k}-logits.npy"
        if done.exists():
            stored = np.load(done, allow_pickle=False)
            if stored.shape == (len(held_out), dataset.num_classes):
                logits[held_out] = stored
                continue
        model, _ = train_from_scratch(
            dataset,
            model_name,
            recipe,
            directory / f"fold{k}",
            device,
            amp_dtype,
            seed=seed,
            workers=workers,
            progress=progress,
            desc=f"fold {k + 1}/{folds}",
            extra_meta={"fold": f"{k}/{folds}"},
            indices=np.flatnonzero(fold != k),
            world=world,
        )
        logits[held_out] = predict(model, dataset, held_out, device, amp_dtype, batch_size, workers)
        if world.is_main:
            buffer = io.BytesIO()
            np.save(buffer, logits[held_out], allow_pickle=False)
            write_atomic(done, buffer.getvalue())
    return logits
