"""The adaptive attacker's terms: what an attacker who knows `sanitize scan` adds to any attack's loss to keep its
poisons from standing out in the scan's embedding. The scan's proxy is trained on the poisoned data, so the attacker
imitates it with its own surrogates (re-trained on the current poisons with `retrain_every`).

`anchor` (the crafting loop's option): the feature-anchoring penalty, the cheap baseline of the gradient-matching
reference's "hidden" variant: each poison's features kept near its clean image's, ||phi(x + delta) - phi(x)||^2,
relative to ||phi(x)||^2 so that one weight suits any network, averaged over poisons and surrogates.

`evade` (the loop's option, with `evade_variant`): a differentiable stand-in for the default scan's flag rule
(sanitize/detectors/knn_density.py), everything about it known: in the feature space of each surrogate, a poison's
log distance to its k-th neighbour in the intended class at both of the scan's scales (k_small, and k_fraction of
the class capped at k_max; the neighbours found anew every step by a differentiable top-k), as a modified z-score
against the clean members' own (median and MAD, fixed per surrogate), combined with the z of its ease (-log loss)
as the scan combines them; the penalty is the mean of softplus(z - z_safe) over the poisons, z_safe a margin below
the flag threshold's 3.5. Two variants: `spread` counts only clean images as neighbours and repels poisons closer to
one another than the clean members' median small-scale distance (what beats group-aware rules); `clump` counts the
poisons as one another's neighbours and pulls them together (what beats lone-point density scores). `evade_scope`
says which poisons count: those of the crafting batch (`batch`, as first built), or all of them (`all`: the other
batches' features as last computed, detached, beside the batch's own; `spread` then keeps each poison's k_small
nearest poisons at that distance, since the scan's small scale sees only those). The class alarm's second pass is
not modelled apart: it looks again only in classes with more flags than the others, and poisons kept under z_safe
add none.

`evade_space` says whose features: the attack's surrogates (`surrogate`, as first built), or `proxy`: proxies of the
default scan's own recipe (its architecture, epochs and augmentation) trained on the data with the current poisons and
trained again every `evade_refresh` craft steps (attacks.refresh), with the attacker's own seeds or, with
`evade_seed=scan`, the default scan's seed (part of the default, so known to the attacker); `evade_model` names another
architecture, the one a scan run with `--model` trains (the attacker who knows that configuration), or several joined by
"+", a proxy of each in the evasion (the attacker who knows scans read as one gate by `sanitize combine`). The defender's proxy
trains on the poisoned set, and a proxy that has seen the poisons groups them where a surrogate trained on clean data
does not (reports/adaptive-attack/attacker-view).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from attacks.base import surrogate_features
from sanitize.errors import SanitizeError
from sanitize.models import Classifier
from sanitize.training import autocast


class FeatureAnchor:
    """The penalty against one set of surrogates; the clean images' features computed once."""

    def __init__(self, surrogates: list[Classifier], clean: torch.Tensor, amp_dtype: torch.dtype | None) -> None:
        self.surrogates, self.amp_dtype = surrogates, amp_dtype
        with torch.no_grad():
            self.clean_features = [surrogate_features(model, clean, amp_dtype) for model in surrogates]

    def __call__(self, images: torch.Tensor, part: slice) -> torch.Tensor:
        total = 0.0
        for model, clean in zip(self.surrogates, self.clean_features):
            anchor = clean[part]
            moved = (surrogate_features(model, images, self.amp_dtype) - anchor).pow(2).sum(dim=1) / anchor.pow(2).sum(
                dim=1
            ).clamp_min(1e-12)
            total = total + moved.mean()
        return total / len(self.surrogates)


MAD_SCALE = 0.6745  # the modified z-score's constant (sanitize.density.robust_z)
Z_SAFE = 2.0  # the evasion's target: well under the flag threshold's z of 3.5


class DensityEvasion:
    """The evasion penalty against one set of surrogates; the intended class's clean features and their own
    statistics computed once per surrogate."""

    def __init__(
        self, surrogates, train, setup, variant: str, amp_dtype, scope="batch", k_small=10, k_fraction=0.5, k_max=1000
    ):
        self.surrogates, self.amp_dtype, self.variant, self.scope = surrogates, amp_dtype, variant, scope
        count = len(setup.poison_indices)
        self.stored: list[torch.Tensor | None] = [None] * len(surrogates)  # per surrogate: every poison's features
        self.seen = torch.zeros(count, dtype=torch.bool)  # which poisons' features are stored
        members = np.setdiff1d(np.flatnonzero(train.labels == setup.intended_class), setup.poison_indices)
        if len(members) <= k_small:
            raise SanitizeError(
                f"evade needs more than {k_small} clean images of the intended class, not {len(members)}"
            )
        n = len(members) + len(setup.poison_indices)  # the class as the scan sees it; the clean reference is smaller
        scales = (k_small, min(max(k_small, round(k_fraction * n)), k_max))
        self.ks = sorted({min(k, len(members) - 1) for k in scales})
        self.label = setup.intended_class
        self.reference = []  # per surrogate: clean features, per-scale (median, MAD) of log k-th distance, loss stats
        device = next(surrogates[0].parameters()).device
        images = [
            train.load_batch(members[i : i + 512])[0].float().div(255).to(device) for i in range(0, len(members), 512)
        ]
        for model in surrogates:
            with torch.no_grad():
                features = torch.cat([surrogate_features(model, x, amp_dtype) for x in images])
                ease = torch.cat([self._ease(model, x) for x in images])
                distances = torch.cdist(features, features)
                distances.fill_diagonal_(float("inf"))
                ordered = distances.topk(max(self.ks), dim=1, largest=False).values
                per_scale = [_median_mad(torch.log(ordered[:, k - 1] + 1e-12)) for k in self.ks]
                self.reference.append((features, per_scale, _median_mad(ease), ordered[:, self.ks[0] - 1].median()))

    def _ease(self, model, x: torch.Tensor) -> torch.Tensor:
        """-log loss of the intended class (the poisons' label), the scan's ease."""
        with autocast(x.device, self.amp_dtype):
            logits = model(x).float()
        loss = F.cross_entropy(logits, torch.full((len(x),), self.label, device=x.device), reduction="none")
        return -torch.log(loss + 1e-12)

    def _outside(self, surrogate: int, part: slice, features: torch.Tensor) -> torch.Tensor:
        """The stored features of the poisons beyond this batch (none with scope `batch`); this batch's stored."""
        if self.scope == "batch":
            return features.new_zeros((0, features.shape[1]))
        if self.stored[surrogate] is None:
            self.stored[surrogate] = features.new_zeros((len(self.seen), features.shape[1]))
        beyond = self.seen.clone()
        beyond[part] = False
        outside = self.stored[surrogate][beyond.to(features.device)]
        self.stored[surrogate][part] = features.detach()
        if surrogate == len(self.surrogates) - 1:
            self.seen[part] = True
        return outside

    def __call__(self, images: torch.Tensor, part: slice) -> torch.Tensor:
        total = 0.0
        for index, (model, (clean, per_scale, ease_stats, small_median)) in enumerate(
            zip(self.surrogates, self.reference)
        ):
            features = surrogate_features(model, images, self.amp_dtype)
            distances = torch.cdist(features, clean)
            among = torch.cdist(features, features)  # the poisons' distances to one another
            others = ~torch.eye(len(features), dtype=torch.bool, device=features.device)
            beyond = torch.cdist(features, self._outside(index, part, features))  # to the other batches' poisons
            if self.variant == "clump":  # the other poisons count as neighbours
                distances = torch.cat([distances, among.masked_fill(~others, 1e9), beyond], dim=1)
            ordered = distances.topk(max(self.ks), dim=1, largest=False).values
            z = (
                torch.stack([_z(torch.log(ordered[:, k - 1] + 1e-12), *stats) for k, stats in zip(self.ks, per_scale)])
                .max(dim=0)
                .values
            )
            ease = _z(self._ease(model, images), *ease_stats)
            z = torch.maximum(z, (z + ease) / math.sqrt(2))  # the scan's low-loss combination at weight 1
            penalty = F.softplus(z - Z_SAFE).mean()
            if len(features) > 1 or beyond.shape[1]:
                if self.variant == "spread" and self.scope == "all":  # each poison's nearest poisons kept apart
                    to_poisons = torch.cat([among.masked_fill(~others, float("inf")), beyond], dim=1)
                    nearest = to_poisons.topk(min(self.ks[0], to_poisons.shape[1] - 1), dim=1, largest=False).values
                    penalty = penalty + F.relu(1 - nearest / small_median).mean()  # (the scan's small scale's)
                else:
                    pairs = torch.cat([among[others], beyond.flatten()])
                    if self.variant == "clump":  # pulled together
                        penalty = penalty + (pairs / small_median).mean()
                    else:  # kept apart: no closer to one another than the clean members' typical small-scale distance
                        penalty = penalty + F.relu(1 - pairs / small_median).mean()
            total = total + penalty
        return total / len(self.surrogates)


def _median_mad(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    median = values.median()
    return median, (values - median).abs().median().clamp_min(1e-6)


def _z(values: torch.Tensor, median: torch.Tensor, mad: torch.Tensor) -> torch.Tensor:
    return MAD_SCALE * (values - median) / mad
