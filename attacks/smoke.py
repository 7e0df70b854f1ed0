"""The smoke scale every attack is first checked on, in seconds: digits (16 px) split into a train and a test set, a
tiny victim trained from scratch without augmentation (flipped digits are other digits), and the target margin a
poisoned training set gives next to random noise of the same size at the same positions."""

from __future__ import annotations

import numpy as np
import torch

from attacks.experiment import arm_data
from sanitize.config import TrainConfig
from sanitize.data.arrays import ArrayDataset, from_arrays
from sanitize.data.digits import digits_arrays
from sanitize.models import create_model
from sanitize.training import channel_stats, predict, train_model

CPU = torch.device("cpu")
RECIPE = TrainConfig(epochs=8, batch_size=64, augment=False)


def digits_split() -> tuple[ArrayDataset, ArrayDataset]:
    """Digits as a train set (1,500) and a test set (297)."""
    x, y = digits_arrays(size=16)
    order = np.random.default_rng(0).permutation(len(x))
    train, test = order[:1500], order[1500:]
    names = [str(c) for c in range(10)]
    return from_arrays(x[train], y[train], names, "digits"), from_arrays(x[test], y[test], names, "digits-test")


def train_tiny(dataset, seed):
    """A tiny victim (or surrogate) trained from scratch with the smoke recipe."""
    torch.manual_seed(seed)
    model = create_model("tiny", 10, (3, 16, 16), width=32)
    model.set_normalization(*channel_stats(dataset))
    train_model(
        model,
        dataset,
        np.arange(len(dataset)),
        TrainConfig(**{**RECIPE.__dict__, "seed": seed}),
        CPU,
        None,
        progress=False,
    )
    return model


def margins_against_noise(train, test, setup, poisons, eps: int, seeds=(0, 1)) -> dict[str, float]:
    """The target's logit margin (intended - true class) of victims trained on the crafted poisons and on random
    +-eps noise at the same positions (the evaluation's random-noise control), averaged over `seeds`."""
    margins = {}
    for name, arm in (("crafted", "undefended"), ("random", "random-noise")):
        data = arm_data(train, arm, poisons, setup, eps)
        values = []
        for seed in seeds:
            logits = predict(train_tiny(data, seed), test, np.array([setup.target_index]), CPU, None)[0]
            values.append(logits[setup.intended_class] - logits[setup.target_class])
        margins[name] = float(np.mean(values))
    return margins
