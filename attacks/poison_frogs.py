"""Poison Frogs (Shafahi, Huang, Najibi, Suciu, Studer, Dumitras & Goldstein, NeurIPS 2018), written from the paper:
the feature-collision attack for the transfer setting, one poison at a time.

Each poison minimises ||f(x) - f(t)||^2 + beta ||x - b||^2 by forward-backward splitting: a step on the feature term,
then the proximal step of the other, x = (x_hat + lr beta b) / (1 + lr beta), which in the perturbation delta = x - b
is a shrink, delta / (1 + lr beta) (`proximal`). beta follows the paper's scaling, beta0 (0.25) x (feature dimension /
input dimension)^2, so that the two terms weigh alike whatever the network. Deviations: the forward step is the shared
loop's Adam (the paper's plain gradient step needs a rate tuned to each network's gradient scale), and the poisons also
stay inside the eps ball of docs/protocol.md; watermarking (a ~30% blend of the target into the base) is not offered,
since under that ball it would be clipped to eps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attacks.base import surrogate_features
from attacks.crafting import CraftingOptions
from attacks.registry import Attack, register_attack


@dataclass
class PoisonFrogsOptions(CraftingOptions):
    iterations: int = 1000
    restarts: int = 1
    lr: float = 0.04  # Adam's rate on the normalised images (as bullseye-polytope)
    milestones: tuple[float, ...] = ()
    batch_size: int = 512  # poisons are independent: any batch size crafts the same
    signed: bool = False
    start: str = "zero"
    beta0: float = 0.25  # the paper's; beta = beta0 x (feature dimension / input dimension)^2


@register_attack("poison-frogs")
class PoisonFrogs(Attack):
    """Loss: each poison's squared feature distance from the target's (mean over the poisons and the substitutes);
    the proximity to the base is the proximal step's."""

    Options = PoisonFrogsOptions
    surrogate = "feature_extractor"

    def __init__(self, options, surrogates, target_image, setup, device, amp_dtype, train=None) -> None:
        super().__init__(options, surrogates, target_image, setup, device, amp_dtype, train)
        target = target_image.float().div(255)[None].to(device)
        with torch.no_grad():
            self.target_features = [surrogate_features(model, target, amp_dtype) for model in surrogates]
        feature_dim = self.target_features[0].shape[1]
        self.beta = options.beta0 * (feature_dim / target.numel()) ** 2
        self.std = surrogates[0].std.to(device)

    def loss(self, poisoned: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        total = 0.0
        for model, target in zip(self.surrogates, self.target_features):
            total = total + (surrogate_features(model, poisoned, self.amp_dtype) - target).pow(2).sum(dim=1).mean()
        return total / len(self.surrogates)

    def proximal(self, delta: torch.Tensor, lr: float) -> None:
        """x = (x_hat + lr beta b) / (1 + lr beta): the perturbation shrinks by 1 + lr beta (in pixel units, where the
        paper's beta lives; delta is normalised, so its step is lr x std in pixel units)."""
        delta.div_(1 + lr * self.std * self.beta)
