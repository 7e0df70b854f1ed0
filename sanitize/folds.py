"""Out-of-fold predictions: K proxies, each trained on all but one fold of the data, predict the fold they never saw.

A proxy trained on the data fits its labels, wrong ones included, so its own predictions cannot say that an example's
label is wrong; a proxy that never saw the example can (cross-validated predicted probabilities, the input of
confident learning: Northcutt, Jiang & Chuang, JAIR 2021). Poisons that carry the attacker's labels (back-gradient
optimisation, label flips) are such examples. Folds are stratified by class and drawn from the scan's seed; each
fold's training resumes from its checkpoint and its rows of the logits go to a memory-mapped file named after the
data, model, recipe and seed (no N x C array in memory; a finished fold is marked and never redone).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from numpy.lib.format import open_memmap

from sanitize.config import TrainConfig
from sanitize.data import ImageDataset, write_atomic
from sanitize.distributed import World, barrier
from sanitize.training import predict, train_from_scratch


def fold_assignment(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Each example's fold in 0..folds-1: every class dealt round-robin over the folds in a seeded random order."""
    rng = np.random.default_rng([seed, folds])
    fold = np.empty(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        fold[rng.permutation(members)] = np.arange(len(members)) % folds
    return fold


def fold_sizes(labels: np.ndarray, folds: int, seed: int) -> list[int]:
    """How many examples each fold holds (none without folds)."""
    return np.bincount(fold_assignment(labels, folds, seed), minlength=folds).tolist() if folds else []


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
    """(N, C) float32 logits, memory-mapped read-only, row i from the proxy trained without example i's fold."""
    fold = fold_assignment(dataset.labels, folds, seed)
    identity = f"{dataset.fingerprint}|{model_name}|{json.dumps(recipe.identity(), sort_keys=True)}|{seed}"
    name = f"logits-{folds}folds-{hashlib.sha256(identity.encode()).hexdigest()[:16]}"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.npy"
    shape = (len(dataset), dataset.num_classes)
    if world.is_main and not _readable(path, shape):
        open_memmap(path, mode="w+", dtype=np.float32, shape=shape).flush()
        for stale in directory.glob(f"{name}.fold*.done"):
            stale.unlink()
    barrier(world)
    for k in range(folds):
        done = directory / f"{name}.fold{k}.done"
        if done.exists():
            continue
        held_out = np.flatnonzero(fold == k)
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
        if world.is_main:  # every rank holds the same trained weights: one predicts
            logits = open_memmap(path, mode="r+")
            logits[held_out] = predict(model, dataset, held_out, device, amp_dtype, batch_size, workers)
            logits.flush()
            del logits
            write_atomic(done, "")
        barrier(world)
    return np.load(path, mmap_mode="r", allow_pickle=False)


def _readable(path: Path, shape: tuple[int, int]) -> bool:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False).shape == shape
    except (OSError, ValueError, EOFError):
        return False
