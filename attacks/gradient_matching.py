"""Witches' Brew: gradient matching (Geiping et al., ICLR 2021), written from the paper and the reference's facts.

The poisons' training gradient is aligned with the gradient that would push the target image to the intended class:

    loss(delta) = 1 - cos( grad_theta CE(f(x_t), y_adv),  grad_theta CE(f(aug(x_p + delta)), y_p) )

over all parameters flattened into one vector, the poison gradient taken with create_graph=True so the loss can be
differentiated in delta. The surrogate is pretrained on clean data and kept in eval mode; with several surrogates (an
ensemble) the loss is their mean, each with a fresh draw of the differentiable augmentation. Optimiser, restarts and
projection are the shared loop's (attacks.crafting), with the reference's settings: signed Adam, lr 0.1, x0.1 at 3/8,
5/8 and 7/8 of 250 iterations, 8 restarts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attacks.base import random_shift_flip
from attacks.crafting import CraftingOptions, parameter_gradient
from attacks.registry import Attack, register_attack


@dataclass
class GradientMatchingOptions(CraftingOptions):
    augment: bool = True  # differentiable shift + flip, as the victims' training augments
    max_shift: int = 4


def alignment_loss(
    poison_grad: list[torch.Tensor], target_grad: list[torch.Tensor], target_norm: torch.Tensor
) -> torch.Tensor:
    """1 - cosine similarity of the two gradients as single flattened vectors."""
    dot = sum((p.float() * t).sum() for p, t in zip(poison_grad, target_grad))
    poison_norm = torch.sqrt(sum(p.float().pow(2).sum() for p in poison_grad))
    return 1 - dot / (poison_norm * target_norm)


@register_attack("gradient-matching")
class GradientMatching(Attack):
    """Loss: 1 - cos(target's adversarial gradient, poisons' training gradient), averaged over the surrogates."""

    Options = GradientMatchingOptions
    surrogate = "model"  # one pretrained model, or an ensemble of them

    def __init__(self, options, surrogates, target_image, setup, device, amp_dtype, train=None) -> None:
        super().__init__(options, surrogates, target_image, setup, device, amp_dtype, train)
        target = target_image.float().div(255)[None]
        intended = torch.tensor([setup.intended_class], device=device)
        self.target_grads = [
            [g.detach() for g in parameter_gradient(m, target, intended, False, amp_dtype)] for m in surrogates
        ]
        self.target_norms = [torch.sqrt(sum(g.pow(2).sum() for g in grads)) for grads in self.target_grads]

    def loss(self, poisoned: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        losses = []
        for model, target_grad, target_norm in zip(self.surrogates, self.target_grads, self.target_norms):
            augment = self.options.augment
            x = random_shift_flip(poisoned, self.options.max_shift, generator) if augment else poisoned
            poison_grad = parameter_gradient(model, x, labels, True, self.amp_dtype)
            losses.append(alignment_loss(poison_grad, target_grad, target_norm))
        return torch.stack(losses).mean()
