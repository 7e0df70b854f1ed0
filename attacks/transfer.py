"""The transfer setting (the poisoning benchmark's, after the Bullseye Polytope reference): a feature extractor
pretrained on one part of the training set, and victims that fine-tune it on a small other part that holds the poisons.

Facts from the reference (ucsb-seclab/BullseyePoison): the extractor is pretrained on 4,800 images per class; the
fine-tuning set is 50 per class drawn from the other 200; victims fine-tune for 60 epochs at batch 64 with Adam, the
rate x0.1 at epochs 30 and 45, the network in eval mode (batch norm statistics frozen) and no augmentation. *Linear*
victims retrain the last layer only (rate 0.1, no weight decay); *end-to-end* victims fine-tune every weight (rate
1e-4, weight decay 5e-4). Both start from the pretrained head, as the reference's do.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from sanitize.data.arrays import ArrayDataset
from sanitize.errors import SanitizeError
from sanitize.models import Classifier
from sanitize.training import autocast

MODES = ("linear", "end-to-end")


def transfer_split(train: ArrayDataset, pool_per_class: int = 200, finetune_per_class: int = 50, seed: int = 0):
    """(pretraining positions, fine-tuning positions): per class, `pool_per_class` random images are held out of
    pretraining and the first `finetune_per_class` of them form the fine-tuning set; the rest pretrain."""
    if finetune_per_class > pool_per_class:
        raise SanitizeError("the fine-tuning set must come from the held-out pool: finetune_per_class <= pool")
    rng = np.random.default_rng([seed, 4800])
    pretrain, finetune = [], []
    for c in range(train.num_classes):
        members = rng.permutation(np.flatnonzero(train.labels == c))
        if len(members) <= pool_per_class:
            raise SanitizeError(
                f"class {train.classes[c]} has {len(members)} images, the split needs more than {pool_per_class}"
            )
        finetune.append(members[:finetune_per_class])
        pretrain.append(members[pool_per_class:])
    return np.sort(np.concatenate(pretrain)), np.sort(np.concatenate(finetune))


@dataclass(frozen=True)
class FineTune:
    """A victim's fine-tuning; a rate or weight decay left None takes the reference's for the mode."""

    mode: str = "linear"
    epochs: int = 60
    batch_size: int = 64
    lr: float | None = None
    weight_decay: float | None = None
    milestones: tuple[float, ...] = (0.5, 0.75)  # fractions of the epochs where the rate drops x0.1

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise SanitizeError(f"fine-tuning mode must be one of {MODES}, not {self.mode!r}")

    @property
    def rate(self) -> float:
        return self.lr if self.lr is not None else (0.1 if self.mode == "linear" else 1e-4)

    @property
    def decay(self) -> float:
        return self.weight_decay if self.weight_decay is not None else (0.0 if self.mode == "linear" else 5e-4)


def fine_tune(
    extractor: Classifier,
    data: ArrayDataset,
    recipe: FineTune,
    seed: int,
    device: torch.device,
    amp: torch.dtype | None,
) -> Classifier:
    """A victim: a copy of the pretrained `extractor` (with its head) fine-tuned on `data`, its batch order drawn from
    `seed`. Linear victims fine-tune the head on features computed once; end-to-end victims fine-tune everything."""
    model = copy.deepcopy(extractor).to(device).eval()
    generator = torch.Generator().manual_seed(seed)
    labels = torch.from_numpy(data.labels).long().to(device)
    linear = recipe.mode == "linear"
    model.requires_grad_(not linear)
    model.head.requires_grad_(True)
    inputs = _features(model, data, device, amp) if linear else None
    trainable = model.head.parameters() if linear else model.parameters()
    optimizer = torch.optim.Adam(trainable, lr=recipe.rate, weight_decay=recipe.decay)
    drops = {round(recipe.epochs * f) for f in recipe.milestones}
    for epoch in range(recipe.epochs):
        if epoch in drops:
            for group in optimizer.param_groups:
                group["lr"] *= 0.1
        order = torch.randperm(len(data), generator=generator)
        for start in range(0, len(order), recipe.batch_size):
            batch = order[start : start + recipe.batch_size]
            if linear:
                logits = model.head(inputs[batch.to(device)])
            else:
                images = data.load_batch(batch.numpy())[0].float().div(255).to(device)
                with autocast(device, amp):
                    logits = model(images).float()
            loss = F.cross_entropy(logits, labels[batch.to(device)])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


@torch.no_grad()
def _features(model: Classifier, data: ArrayDataset, device: torch.device, amp: torch.dtype | None) -> torch.Tensor:
    parts = []
    for start in range(0, len(data), 256):
        images = data.load_batch(np.arange(start, min(len(data), start + 256)))[0].float().div(255).to(device)
        with autocast(device, amp):
            parts.append(model.features(images).float())
    return torch.cat(parts)
