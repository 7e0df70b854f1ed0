"""The adaptive attacker's terms: what an attacker who knows `sanitize scan` adds to any attack's loss to keep its
poisons from standing out in the scan's embedding. The scan's proxy is trained on the poisoned data, so the attacker
imitates it with its own surrogates (re-trained on the current poisons with `retrain_every`).

`anchor` (the crafting loop's option): the feature-anchoring penalty, the cheap baseline of the gradient-matching
reference's "hidden" variant: each poison's features kept near its clean image's, ||phi(x + delta) - phi(x)||^2,
relative to ||phi(x)||^2 so that one weight suits any network, averaged over poisons and surrogates.
"""

from __future__ import annotations

import torch

from sanitize.models import Classifier
from sanitize.training import autocast


class FeatureAnchor:
    """The penalty against one set of surrogates; the clean images' features computed once."""

    def __init__(self, surrogates: list[Classifier], clean: torch.Tensor, amp_dtype: torch.dtype | None) -> None:
        self.surrogates, self.amp_dtype = surrogates, amp_dtype
        with torch.no_grad():
            self.clean_features = [self._features(model, clean) for model in surrogates]

    def _features(self, model: Classifier, images: torch.Tensor) -> torch.Tensor:
        with autocast(images.device, self.amp_dtype):
            return model.features(images).float()

    def __call__(self, images: torch.Tensor, part: slice) -> torch.Tensor:
        total = 0.0
        for model, clean in zip(self.surrogates, self.clean_features):
            anchor = clean[part]
            moved = (self._features(model, images) - anchor).pow(2).sum(dim=1) / anchor.pow(2).sum(dim=1).clamp_min(
                1e-12
            )
            total = total + moved.mean()
        return total / len(self.surrogates)
