"""The transfer setting (the poisoning benchmark's, after the Bullseye Polytope reference): a feature extractor
pretrained on one part of the training set, and victims that fine-tune it on a small other part that holds the poisons.

Facts from the reference (ucsb-seclab/BullseyePoison): the extractor is pretrained on 4,800 images per class; the
fine-tuning set is 50 per class drawn from the other 200; victims fine-tune for 60 epochs at batch 64 with Adam, the
rate x0.1 at epochs 30 and 45, the network in eval mode (batch norm statistics frozen) and no augmentation. *Linear*
victims retrain the last layer only (rate 0.1, no weight decay); *end-to-end* victims fine-tune every weight (rate
1e-4, weight decay 5e-4). Both start from the pretrained head, as the reference's do. *Robust* victims fine-tune while
the product's EPIC dropper (sanitize.robust) runs a round after every epoch of the first quarter, as EPIC's reference
(YuYang0901/EPIC) does in transfer: every epoch from 1, none from epoch 10 of 40. `TransferSetting` holds one
configuration's data, extractor and poisons for the evaluation (attacks.evaluate_transfer) and the benchmarks.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from attacks.base import (
    PoisonSet,
    PoisonSetup,
    choose_setup,
    keep_poisons,
    stored_poisons,
    surrogate_features,
)
from attacks.crafting import craft, options_identity
from attacks.experiment import measure_victim
from attacks.registry import attack_options
from attacks.surrogates import published_model
from attacks.trained import ModelCache, stable_hash
from sanitize.config import RobustConfig, TrainConfig
from sanitize.data import open_dataset
from sanitize.data.arrays import ArrayDataset
from sanitize.errors import SanitizeError
from sanitize.models import Classifier
from sanitize.robust import EpicDropper
from sanitize.training import autocast, channel_stats, resolve_device, resolve_precision

MODES = ("linear", "end-to-end")
EXTRACTOR_SEED = 0  # the victims' extractor; white-box attacks craft against this one
SUBSTITUTE_SEED = 1  # black-box substitutes: never the victims' network, even where of its architecture
ROBUST_ROUNDS = RobustConfig(every=1)  # EPIC's transfer recipe: a round after every epoch, the product's other defaults
ROBUST_STOP = 10 / 40  # ... and none from this share of the epochs on (EPIC's reference: epoch 10 of 40)


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
    after_epoch: Callable[[int, torch.nn.Module, np.ndarray], np.ndarray] | None = None,
) -> Classifier:
    """A victim: a copy of the pretrained `extractor` (with its head) fine-tuned on `data`, its batch order drawn from
    `seed`. Linear victims fine-tune the head on features computed once; end-to-end victims fine-tune everything.
    `after_epoch(epoch, model, positions)` returns the positions the next epoch trains on (robust training's drops)."""
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
    survivors = np.arange(len(data))
    for epoch in range(recipe.epochs):
        if epoch in drops:
            for group in optimizer.param_groups:
                group["lr"] *= 0.1
        order = torch.from_numpy(survivors)[torch.randperm(len(survivors), generator=generator)]
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
        if after_epoch is not None:
            survivors = after_epoch(epoch, model, survivors)
            model.eval()  # the dropper leaves the model in train mode; fine-tuning keeps batch norm frozen
    return model.eval()


@torch.no_grad()
def _features(model: Classifier, data: ArrayDataset, device: torch.device, amp: torch.dtype | None) -> torch.Tensor:
    parts = []
    for start in range(0, len(data), 256):
        images = data.load_batch(np.arange(start, min(len(data), start + 256)))[0].float().div(255).to(device)
        parts.append(surrogate_features(model, images, amp))
    return torch.cat(parts)


@dataclass
class TransferConfig:
    attack: str = "bullseye-polytope"
    mode: str = "linear"
    keys: tuple[int, ...] = tuple(range(8))
    victims: int = 2
    eps: float = 25.0  # the reference's 0.1 of the pixel range
    poisons: int = 5
    arms: tuple[str, ...] = ("clean", "undefended", "random-noise")
    extractor: str = "resnet18_cifar_w16"
    extractor_epochs: int = 30  # the full scale's recipe (docs/protocol.md)
    # black-box: the attacker crafts against these architectures, pretrained as the extractor is on the same data with
    # another seed, instead of the victims' own extractor (white-box, the default: none)
    substitutes: tuple[str, ...] = ()
    pool_per_class: int = 200  # held out of pretraining (the reference's split) ...
    finetune_per_class: int = 50  # ... of which the fine-tuning set
    finetune_epochs: int = 60
    craft_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    device: str = "auto"
    precision: str = "auto"
    cache: str | None = None  # default OUT/cache


class TransferSetting:
    """One configuration's data, split, extractor (pretrained once on the pretraining split and cached in `cache`) and
    victims' recipe, and its poisons (crafted against the extractor, white-box, or against substitutes pretrained
    alike, black-box; cached beside it)."""

    def __init__(
        self,
        train_path: str | Path,
        test_path: str | Path,
        config: TransferConfig,
        cache: Path,
        published: Path | None = None,
    ) -> None:
        self.config, self.cache, self.published = config, cache, published
        self.recipe = FineTune(config.mode, epochs=config.finetune_epochs)
        self.options = attack_options(config.attack, **config.craft_options)
        self.device = resolve_device(config.device)
        self.amp = resolve_precision(config.precision, self.device)
        train = open_dataset(Path(train_path), progress=False)
        self.test = open_dataset(Path(test_path), progress=False)
        if not isinstance(train, ArrayDataset):
            raise SanitizeError("the transfer setting needs .npz training data")
        pretrain_positions, finetune_positions = transfer_split(train, config.pool_per_class, config.finetune_per_class)
        self.pretrain, self.finetune = train.subset(pretrain_positions), train.subset(finetune_positions)
        self.pretrain_stats = channel_stats(self.pretrain)
        self.extractor, self.extractor_path = self._pretrained(config.extractor, EXTRACTOR_SEED, "extractor")
        # what the attacker crafts against: the extractor itself (white-box) or its substitutes (black-box)
        substitutes = [self._pretrained(name, SUBSTITUTE_SEED, "substitute") for name in config.substitutes]
        self.crafted_against = substitutes or [(self.extractor, self.extractor_path)]

    def _pretrained(self, name: str, seed: int, tag: str) -> tuple[Classifier, Path]:
        """A `name` network pretrained on the pretraining split (cached: trained once), in eval mode, and its path."""
        models = ModelCache(
            self.cache,
            name,
            {},
            TrainConfig(epochs=self.config.extractor_epochs),
            self.pretrain.num_classes,
            self.pretrain.image_size,
            *self.pretrain_stats,
            self.device,
            self.amp,
            progress=False,
        )
        copies = self.published / "extractors" if self.published is not None else None
        model, _ = published_model(models, self.pretrain, copies, seed, tag)
        return model.to(self.device).eval(), models.path(self.pretrain, seed, tag)

    def setup(self, key: int) -> PoisonSetup:
        return choose_setup(key, self.finetune, self.test, self.config.poisons / len(self.finetune))

    def poisons(self, setup: PoisonSetup) -> PoisonSet:
        """The key's poisons from the cache, or crafted against the extractor and cached."""
        identity = [self.config.attack, self.config.eps, setup.key, options_identity(self.options)]
        threat = "-black-box" if self.config.substitutes else ""
        name = f"poisons-{self.config.attack}-transfer{threat}-key{setup.key}-eps{self.config.eps:g}"
        path = self.cache / f"{name}-{stable_hash(*identity, *(p.stem for _, p in self.crafted_against))}.npz"
        places = [path] + ([self.published / "poisons" / path.name] if self.published is not None else [])
        stored = stored_poisons(places, setup)
        if stored is not None:
            return stored
        target = self.test.load_image(setup.target_index)
        poisons = craft(
            self.config.attack,
            [model for model, _ in self.crafted_against],
            self.finetune,
            target,
            setup,
            self.config.eps,
            self.options,
            self.device,
            self.amp,
            False,
        )
        keep_poisons(poisons, places)  # in the cache and beside the results (OUT/poisons/), as `evaluate` keeps them
        return poisons

    def victim(self, data: ArrayDataset, seed: int, drop_log: Path | None = None) -> Classifier:
        """A victim fine-tuned on `data`; with `drop_log`, robust: EPIC's rounds drop isolated examples as it goes
        and log them there."""
        dropper = None
        if drop_log is not None:
            last_round = math.ceil(self.recipe.epochs * ROBUST_STOP) - 1
            dropper = EpicDropper(data, ROBUST_ROUNDS, self.recipe.epochs, last_round, drop_log, self.device, self.amp)
        return fine_tune(self.extractor, data, self.recipe, seed, self.device, self.amp, dropper)

    def measure(self, victim: Classifier, setup: PoisonSetup) -> dict[str, Any]:
        return measure_victim(victim, self.test, setup, self.device, self.amp)
