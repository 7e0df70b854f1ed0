"""What every model in the registry is: input normalisation, a feature body and a linear head.

Models take images in [0, 1]; normalisation is the first layer so that attacks and gradients live in pixel space.
"""

from __future__ import annotations

import torch
from torch import nn

DEFAULT_MEAN = (0.485, 0.456, 0.406)
DEFAULT_STD = (0.229, 0.224, 0.225)


class Classifier(nn.Module):
    """`features(x)` -> (B, D) penultimate activations; `head` maps them to C logits."""

    def __init__(self, body: nn.Module, feature_dim: int, num_classes: int):
        super().__init__()
        self.register_buffer("mean", torch.tensor(DEFAULT_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(DEFAULT_STD).view(1, 3, 1, 1))
        self.body = body
        self.head = nn.Linear(feature_dim, num_classes)
        self.feature_dim = feature_dim
        self.num_classes = num_classes

    def set_normalization(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Use the data's per-channel statistics (stored with the weights)."""
        self.mean.copy_(torch.as_tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.std.copy_(torch.as_tensor(std, dtype=torch.float32).view(1, 3, 1, 1).clamp_min(1e-3))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body((x - self.mean) / self.std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
