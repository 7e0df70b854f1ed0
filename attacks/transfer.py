"""The transfer setting (the poisoning benchmark's, after the Bullseye Polytope reference): a feature extractor
pretrained on one part of the training set, and victims that fine-tune it on a small other part that holds the poisons.

Facts from the reference (ucsb-seclab/BullseyePoison): the extractor is pretrained on 4,800 images per class; the
fine-tuning set is 50 per class drawn from the other 200; victims fine-tune as `sanitize finetune` does, by the
reference's recipe (sanitize.finetuner: linear or end-to-end; robust victims with EPIC's rounds). `TransferSetting`
holds one configuration's data, extractor and poisons for the evaluation (attacks.evaluate_transfer) and the
benchmarks.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from attacks.base import (
    PoisonSet,
    PoisonSetup,
    choose_setup,
    keep_poisons,
    stored_poisons,
)
from attacks.crafting import craft, options_identity
from attacks.experiment import measure_victim
from attacks.registry import attack_options
from attacks.surrogates import published_model
from attacks.trained import ModelCache, stable_hash
from sanitize.config import TrainConfig
from sanitize.data import open_dataset
from sanitize.data.arrays import ArrayDataset
from sanitize.errors import SanitizeError
from sanitize.finetuner import FineTune, fine_tune, robust_dropper
from sanitize.models import Classifier
from sanitize.training import channel_stats, resolve_device, resolve_precision

EXTRACTOR_SEED = 0  # the victims' extractor; white-box attacks craft against this one
SUBSTITUTE_SEED = 1  # black-box substitutes: never the victims' network, even where of its architecture


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
        """A victim fine-tuned on `data` as `sanitize finetune` does; with `drop_log`, robust (`--robust`): EPIC's
        rounds drop isolated examples as it goes and log them there."""
        dropper = robust_dropper(data, self.recipe, drop_log, self.device, self.amp) if drop_log is not None else None
        return fine_tune(self.extractor, data, self.recipe, seed, self.device, self.amp, dropper)

    def measure(self, victim: Classifier, setup: PoisonSetup) -> dict[str, Any]:
        return measure_victim(victim, self.test, setup, self.device, self.amp)
