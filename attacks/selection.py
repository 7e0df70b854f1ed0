"""Which training images become poisons. By default the key picks them at random from the intended class
(attacks.base.choose_setup); `selection="gradient-norm"` takes instead the images of the intended class whose training
gradient on the surrogate(s) is largest (Sleeper Agent's selection: they move the model most per unit of change)."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from attacks.base import PoisonSetup
from attacks.crafting import parameter_gradient
from sanitize.data import ImageDataset, iterate_batches
from sanitize.errors import SanitizeError
from sanitize.models import Classifier

SELECTIONS = ("random", "gradient-norm")


def gradient_norms(models: list[Classifier], data: ImageDataset, positions: np.ndarray) -> np.ndarray:
    """Per image: the norm of its own cross-entropy parameter gradient, averaged over the models (eval mode, fp32)."""
    norms = np.zeros(len(positions))
    for model in models:
        model.eval()
        done = 0
        for images, labels, _ in iterate_batches(data, positions, 1):
            grads = parameter_gradient(model, images.float().div(255), labels.long(), False, None)
            norms[done] += float(torch.sqrt(sum(g.pow(2).sum() for g in grads))) / len(models)
            done += 1
    return norms


def select_poisons(setup: PoisonSetup, selection: str, models: list[Classifier], data: ImageDataset) -> PoisonSetup:
    """The key's setup with its poison positions chosen by `selection` (the same count, from the intended class)."""
    if selection not in SELECTIONS:
        raise SanitizeError(f"selection must be one of {', '.join(SELECTIONS)}")
    if selection == "random":
        return setup
    pool = np.flatnonzero(data.labels == setup.intended_class)
    chosen = pool[np.argsort(-gradient_norms(models, data, pool), kind="stable")[: len(setup.poison_indices)]]
    return dataclasses.replace(setup, poison_indices=tuple(int(i) for i in np.sort(chosen)))
