"""The evaluation's scales (docs/protocol.md): data subset, model, victim recipe and attack effort, and the configuration
of one evaluation run. A scale's crafting effort names only the shared loop's options (attacks.crafting.CraftingOptions):
one effort for every attack, and where an attack's paper sets its own (gradient matching's 250 steps and restarts),
that attack's; an attack's own options come from its dataclass, overridable per run."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from attacks.arms import ARMS, CONTROL_ARMS, SCAN_COMBINED
from attacks.registry import attack_options
from sanitize.config import PAPER_NOISE_EPS, FitConfig, RobustConfig, TrainConfig
from sanitize.data import ImageDataset
from sanitize.data.arrays import ArrayDataset
from sanitize.errors import SanitizeError

GRADIENT_MATCHING = "gradient-matching"


@dataclass
class Scale:
    """One row of docs/protocol.md's scales: data subset, model, victim recipe and attack effort."""

    model: str
    model_kwargs: dict[str, Any]
    per_class: int | None  # class-balanced training subset; None = all
    train: TrainConfig
    craft: dict[str, Any]  # the shared loop's effort for every attack at this scale
    # an attack's own effort at this scale, where it differs: the paper's for gradient matching, which other attacks
    # do not share (MetaPoison's 61 craft steps and one restart are its options' defaults)
    attack_craft: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    def effort(self, attack: str) -> dict[str, Any]:
        """The crafting options this scale sets for `attack`."""
        return {**self.craft, **self.attack_craft.get(attack, {})}


SCALES = {
    "smoke": Scale("tiny", {}, 60, TrainConfig(epochs=6, batch_size=64), {"iterations": 20, "restarts": 1}),
    # 40 epochs, not 20: 20-epoch victims stayed too underfit to be poisoned (reports/gradient-matching-cpu-ablations)
    "cpu": Scale(
        "convnet", {}, 1000, TrainConfig(epochs=40), {}, {GRADIENT_MATCHING: {"iterations": 250, "restarts": 4}}
    ),
    # all 50,000 CIFAR-10 images (500 poisons at 1%) with a victim of <= 30 CPU-minutes here that reaches >= 85%: the
    # ResNet-18 of width 16 for 30 epochs, 85.9% in 25 CPU-minutes (reports/gradient-matching-pilot, step 3)
    "full": Scale(
        "resnet18_cifar_w16",
        {},
        None,
        TrainConfig(epochs=30),
        {},
        {GRADIENT_MATCHING: {"iterations": 250, "restarts": 4}},
    ),
    "paper": Scale(
        "resnet18_cifar",
        {},
        None,
        TrainConfig(epochs=40, milestones=(14 / 40, 24 / 40, 35 / 40)),
        {},
        {GRADIENT_MATCHING: {"iterations": 250, "restarts": 8}},
    ),
}


@dataclass
class EvaluationConfig:
    attack: str = GRADIENT_MATCHING
    scale: str = "cpu"
    keys: tuple[int, ...] = tuple(range(8))
    victims: int = 4
    # the victims' seeds; None: 0..victims-1 (a subset splits one run across processes)
    seeds: tuple[int, ...] | None = None
    eps: float = 16.0
    budget: float = 0.01
    arms: tuple[str, ...] = CONTROL_ARMS  # defended arms are asked for by name
    model: str | None = None  # override the scale's model (a registry name), for ablations
    epochs: int | None = None  # override the scale's victim epochs
    restarts: int | None = None
    iterations: int | None = None
    # overrides of the scale's recipe for surrogate and victims: crop + flip (the no-augmentation check), learning rate
    augment: bool | None = None
    lr: float | None = None
    surrogates: int = 1  # the attacker's ensemble: this many surrogates of other seeds
    # override the attack's own options by name
    craft_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    # the scan arm's options where they differ from `sanitize scan`'s defaults (a variant of the arm, on tuning keys)
    scan_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    # robust training's options where they differ from `sanitize train --robust`'s defaults (a variant of the robust
    # arms, on tuning keys)
    robust_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    noise_eps: float = PAPER_NOISE_EPS  # the noise arms' noise (`sanitize train --noise-eps`, and --friendly-eps)
    craft_only: bool = False  # craft (or find) each key's poisons, cache and publish them, and train no victim
    device: str = "auto"
    precision: str = "auto"
    subset_seed: int = 0
    cache: str | None = None  # where surrogates, clean victims and poisons are kept; default OUT/cache

    def __post_init__(self) -> None:
        # cache names hash these: eps=16 and eps=16.0 must name the same poisons (an int once re-crafted a cached key)
        self.eps, self.budget, self.noise_eps = float(self.eps), float(self.budget), float(self.noise_eps)

    def resolved(self) -> tuple[Scale, TrainConfig, Any]:
        if self.scale not in SCALES:
            raise SanitizeError(f"unknown scale {self.scale!r}; choose from {', '.join(SCALES)}")
        unknown = set(self.arms) - set(ARMS)
        if unknown:
            raise SanitizeError(f"unknown arm(s) {', '.join(sorted(unknown))}; choose from {', '.join(ARMS)}")
        if SCAN_COMBINED in self.arms and not self.scan_options:
            raise SanitizeError("the scan-combined arm needs --scan-option: the second scan's proxy, e.g. model=NAME")
        scale = SCALES[self.scale]
        if self.model:
            scale = dataclasses.replace(scale, model=self.model, model_kwargs={})
        train = dataclasses.replace(scale.train, epochs=self.epochs or scale.train.epochs)
        if self.augment is not None:
            train = dataclasses.replace(train, augment=self.augment)
        if self.lr is not None:
            train = dataclasses.replace(train, lr=self.lr)
        if self.surrogates < 1:
            raise SanitizeError("surrogates must be >= 1")
        if not 0 < self.noise_eps <= 255:
            raise SanitizeError("noise_eps must be in (0, 255]")
        options = scale.effort(self.attack)
        options.update({k: v for k, v in (("restarts", self.restarts), ("iterations", self.iterations)) if v})
        options.update(self.craft_options)
        return scale, train, attack_options(self.attack, **options)

    def robust_config(self) -> RobustConfig:
        """The robust arms' settings: `sanitize train --robust`'s defaults with `robust_options`, checked as the
        command checks them."""
        names = [f.name for f in dataclasses.fields(RobustConfig)]
        unknown = set(self.robust_options) - set(names)
        if unknown:
            raise SanitizeError(
                f"unknown robust option(s) {', '.join(sorted(unknown))}; choose from {', '.join(names)}"
            )
        defaults = dataclasses.asdict(RobustConfig())
        for name, value in self.robust_options.items():
            if isinstance(defaults[name], bool):
                if not isinstance(value, bool):
                    raise SanitizeError(f"robust option {name} takes true or false, not {value!r}")
            elif (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                and not (name == "every" and value is None)
            ):
                raise SanitizeError(f"robust option {name} takes a number, not {value!r}")
        return FitConfig.from_options(**self.robust_options).epic


def class_balanced_subset(dataset: ImageDataset, per_class: int | None, seed: int) -> ArrayDataset:
    """A fixed subset with `per_class` random examples of every class (all of them for None)."""
    if not isinstance(dataset, ArrayDataset):
        raise SanitizeError("evaluate needs .npz training data (write an ImageFolder to npz first)")
    if per_class is None:
        return dataset
    rng = np.random.default_rng(seed)
    chosen = []
    for c in range(dataset.num_classes):
        members = np.flatnonzero(dataset.labels == c)
        if len(members) < per_class:
            raise SanitizeError(f"class {dataset.classes[c]} has {len(members)} examples, the scale needs {per_class}")
        chosen.append(rng.choice(members, per_class, replace=False))
    return dataset.subset(np.sort(np.concatenate(chosen)))
