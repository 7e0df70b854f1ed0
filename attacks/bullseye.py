"""Bullseye Polytope (Aghakhani, Meng, Wang, Kruegel & Vigna, EuroS&P 2021), written from the paper and the reference's
facts (ucsb-seclab/BullseyePoison): a feature-collision attack for the transfer setting, where the victim reuses a
feature extractor the attacker can also run.

The poisons' *mean* feature is pulled onto the target's: loss ||mean_j f(x_j) - f(t)|| / ||f(t)|| (a norm, not
squared), averaged over the substitute extractors, optionally with dropout on the features, averaged over `draws`
stochastic passes (the reference's multi-draw dropout, net-repeat). Every poison enters one loss, so one crafting batch
holds them all. The reference's defaults: Adam at 0.04 on the normalised images, 4,000 iterations without decay, the
poisons started at the clean bases, one run. The end-to-end variant (`blocks`, for victims that fine-tune every
weight) applies the loss at the output of every block as well, averaged: each conv-BN-ReLU block at the top of the
body (its ReLU) and each residual block of a stage, then the penultimate features. Deviations: the reference's
substitutes were trained with dropout, the project's models have none, so dropout here is applied at crafting time
only (off by default, as the reference's net-repeat 1); the convex-polytope mode (coefficients solved on the simplex)
is not implemented.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attacks.base import surrogate_features
from attacks.crafting import CraftingOptions
from attacks.registry import Attack, register_attack
from sanitize.errors import SanitizeError


@dataclass
class BullseyeOptions(CraftingOptions):
    iterations: int = 4000
    restarts: int = 1
    lr: float = 0.04  # Adam's rate on the normalised images (the reference's)
    milestones: tuple[float, ...] = ()
    batch_size: int = 1_000_000  # the loss couples every poison: all of them in one batch
    signed: bool = False
    start: str = "zero"
    dropout: float = 0.0  # feature dropout while crafting (the reference's substitutes carry 0.2-0.3)
    draws: int = 1  # stochastic passes averaged per step when dropout is on (the reference's net-repeat)
    blocks: bool = False  # the end-to-end variant: the loss at every block's output too


@register_attack("bullseye-polytope")
class BullseyePolytope(Attack):
    """Loss: the distance of the poisons' mean feature from the target's, relative to the target's feature norm,
    averaged over the substitute extractors."""

    Options = BullseyeOptions
    surrogate = "feature_extractor"

    def __init__(self, options, surrogates, target_image, setup, device, amp_dtype, train=None) -> None:
        super().__init__(options, surrogates, target_image, setup, device, amp_dtype, train)
        if not 0 <= options.dropout < 1 or options.draws < 1:
            raise SanitizeError("bullseye-polytope needs 0 <= dropout < 1 and draws >= 1")
        target = target_image.float().div(255)[None].to(device)
        with torch.no_grad():
            self.target_features = [self._features(model, target, dropout=0.0) for model in surrogates]

    def _features(self, model, x: torch.Tensor, dropout: float) -> list[torch.Tensor]:
        """The penultimate features (after `dropout`), preceded with `blocks` by every block's output, flattened."""
        outputs: list[torch.Tensor] = []
        hooks = [m.register_forward_hook(lambda _, __, out: outputs.append(out)) for m in self._blocks(model)]
        try:
            features = surrogate_features(model, x, self.amp_dtype)
        finally:
            for hook in hooks:
                hook.remove()
        features = F.dropout(features, dropout, training=True) if dropout else features
        return [out.float().flatten(1) for out in outputs] + [features]

    def _blocks(self, model) -> list[torch.nn.Module]:
        if not self.options.blocks:
            return []
        found = []
        for child in model.body.children():
            if isinstance(child, torch.nn.ReLU):
                found.append(child)
            elif isinstance(child, torch.nn.Sequential):
                found.extend(child.children())
        return found

    def loss(self, poisoned: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        total = 0.0
        for model, targets in zip(self.surrogates, self.target_features):
            draws = self.options.draws if self.options.dropout else 1
            passes = [self._features(model, poisoned, self.options.dropout) for _ in range(draws)]
            for level, target in enumerate(targets):
                features = sum(p[level] for p in passes) / draws
                total = total + (features.mean(dim=0) - target[0]).norm() / target[0].norm() / len(targets)
        return total / len(self.surrogates)
