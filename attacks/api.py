"""`sanitize attack` as a function: surrogate, setup from the key, crafting, lossless poisoned copy + manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from attacks import attack_options, choose_setup, craft
from attacks.base import WRITABLE_KINDS, write_poisoned
from attacks.selection import select_poisons
from attacks.surrogates import surrogate as cached_surrogate
from attacks.trained import ModelCache
from sanitize.config import TrainConfig
from sanitize.data import ensure_outside, open_dataset
from sanitize.errors import SanitizeError
from sanitize.manifest import read_manifest
from sanitize.models import create_model, load_weights
from sanitize.training import channel_stats, resolve_device, resolve_precision


def attack_dataset(
    data: str | Path,
    test: str | Path,
    out: str | Path,
    method: str = "gradient-matching",
    key: int = 0,
    budget: float = 0.01,
    eps: float = 16.0,
    surrogate: str | None = None,
    epochs: int = 40,
    model: str = "convnet",
    device: str = "auto",
    seed: int = 0,
    progress: bool = True,
    **craft_options: Any,
) -> dict[str, Any]:
    """Craft poisons for poison key `key` against DATA; returns the manifest written beside the poisoned copy. The
    surrogate is `surrogate`'s weights, or one trained on DATA with `seed` and kept in OUT/surrogates/ (a rerun loads
    it)."""
    out = Path(out)
    data, test = Path(data), Path(test)
    ensure_outside(data, out)
    options = attack_options(method, seed=seed, **craft_options)  # a bad option fails before any training
    train_set = open_dataset(data, progress=progress)
    if train_set.kind not in WRITABLE_KINDS:  # before crafting, not after it
        raise SanitizeError(f"poisoned copies are written for ImageFolder or .npz data, not {train_set.kind}")
    test_set = open_dataset(test, progress=progress)
    setup = choose_setup(key, train_set, test_set, budget)
    run_device = resolve_device(device)
    amp = resolve_precision("auto", run_device)
    if surrogate:
        torch.manual_seed(seed)
        net = create_model(model, train_set.num_classes, (3, *train_set.image_size))
        load_weights(net, Path(surrogate))
    else:
        mean, std = channel_stats(train_set)
        cache = ModelCache(
            out / "surrogates",
            model,
            {},
            TrainConfig(epochs=epochs),
            train_set.num_classes,
            train_set.image_size,
            mean,
            std,
            run_device,
            amp,
            progress,
        )
        net, _ = cached_surrogate(cache, train_set, None, seed)
    setup = select_poisons(setup, options.selection, [net], train_set)
    target = test_set.load_image(setup.target_index)
    poisons = craft(
        method, [net], train_set, target, setup, eps, options, device=run_device, amp_dtype=amp, progress=progress
    )
    write_poisoned(train_set, poisons, out, seed=seed, target_image=target)
    return read_manifest(out)
