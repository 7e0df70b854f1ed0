"""`sanitize attack` as a function: surrogate, setup from the key, crafting, lossless poisoned copy + manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from attacks import choose_setup, craft, method_config
from attacks.base import write_poisoned
from sanitize.config import TrainConfig
from sanitize.data import ensure_outside, open_dataset
from sanitize.manifest import read_manifest
from sanitize.models import create_model, load_weights
from sanitize.training import channel_stats, resolve_device, resolve_precision, train_model


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
    """Craft poisons for poison key `key` against DATA; returns the manifest written beside the poisoned copy."""
    out = Path(out)
    data, test = Path(data), Path(test)
    ensure_outside(data, out)
    train_set = open_dataset(data, progress=progress)
    test_set = open_dataset(test, progress=progress)
    setup = choose_setup(key, train_set, test_set, budget)
    run_device = resolve_device(device)
    amp = resolve_precision("auto", run_device)
    torch.manual_seed(seed)
    net = create_model(model, train_set.num_classes, (3, *train_set.image_size))
    if surrogate:
        load_weights(net, Path(surrogate))
    else:
        net.set_normalization(*channel_stats(train_set, seed=seed))
        train_model(
            net,
            train_set,
            np.arange(len(train_set)),
            TrainConfig(epochs=epochs, seed=seed),
            run_device,
            amp,
            progress=progress,
            desc="surrogate",
        )
    config = method_config(method, seed=seed, **craft_options)
    poisons = craft(
        method,
        [net],
        train_set,
        test_set.load_image(setup.target_index),
        setup,
        eps,
        config,
        device=run_device,
        amp_dtype=amp,
        progress=progress,
    )
    write_poisoned(train_set, poisons, out, seed=seed, target_image=test_set.load_image(setup.target_index))
    return read_manifest(out)
