"""Which poisons carry an attack: each poison's pull on the target, and the fewest poisons holding half of it.

Measured on the attacker's surrogate for any attack: defended rows say how many carriers each defense caught, since
the carriers are what makes the attack work (reports/detection-cpu).
"""

from __future__ import annotations

import numpy as np
import torch

from attacks.crafting import parameter_gradient
from sanitize.models import Classifier


def _flat_gradient(model: Classifier, image: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    return torch.cat(
        [g.flatten() for g in parameter_gradient(model, image[None].float().div(255), label.view(1), False, None)]
    )


def poison_pull(
    model: Classifier, images: torch.Tensor, labels: torch.Tensor, target_image: torch.Tensor, intended_class: int
) -> np.ndarray:
    """Each poison's pull on the target: its own parameter gradient projected on the unit adversarial target gradient
    (eval mode, fp32, no augmentation); gradient matching aligns their sum. Images are uint8 (P, 3, H, W) and
    (3, H, W)."""
    model.eval()
    target_grad = _flat_gradient(model, target_image, torch.tensor(intended_class))
    direction = target_grad / target_grad.norm()
    return np.array(
        [float(_flat_gradient(model, image, label.long()) @ direction) for image, label in zip(images, labels)]
    )


def pull_carriers(pull: np.ndarray) -> np.ndarray:
    """Mask of the fewest poisons whose pulls add up to half of the total: the ones that carry the attack."""
    order = np.argsort(-pull)
    count = int(np.searchsorted(np.cumsum(pull[order]), 0.5 * pull.sum())) + 1
    carriers = np.zeros(len(pull), bool)
    carriers[order[:count]] = True
    return carriers
