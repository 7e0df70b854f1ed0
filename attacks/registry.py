"""The attack registry, as timm's model registry: every attack is one file with a class registered by name.

An attack declares its options (a dataclass with defaults that extends the crafting loop's `CraftingOptions`), the
surrogate it needs (one of SURROGATE_KINDS) and the loss it optimises over a batch of poisoned images. The shared loop
(attacks.crafting) does everything else: restarts, the optimiser, projection, quantisation, checkpoints, progress.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from attacks.base import PoisonSetup
from sanitize.data import ImageDataset
from sanitize.errors import SanitizeError
from sanitize.models import Classifier
from sanitize.wording import unknown

# what an attack may need to craft against: one model; several trained with other seeds; one model at several points
# of its training; a frozen feature extractor (transfer setting)
SURROGATE_KINDS = ("model", "ensemble", "checkpoints", "feature_extractor")


class Attack:
    """Base of every registered attack: built once per craft, then asked for the loss of batches of poisons."""

    name: str = ""
    Options: type  # the options dataclass (extends attacks.crafting.CraftingOptions)
    surrogate: str = "model"  # one of SURROGATE_KINDS

    def __init__(
        self,
        options: Any,
        surrogates: list[Classifier],
        target_image: torch.Tensor,
        setup: PoisonSetup,
        device: torch.device,
        amp_dtype: torch.dtype | None,
        train: ImageDataset | None = None,
    ) -> None:
        self.options, self.surrogates, self.setup, self.device, self.amp_dtype, self.train = (
            options,
            surrogates,
            setup,
            device,
            amp_dtype,
            train,
        )

    def loss(self, poisoned: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The loss of one batch of poisoned images in [0, 1] (differentiable in them); lower is a stronger attack."""
        raise NotImplementedError

    def proximal(self, delta: torch.Tensor, lr: float) -> None:
        """Called after every optimiser step, before the projection, with the additive perturbation (normalised units,
        changed in place) and the step's rate: the backward step of an attack optimised by forward-backward
        splitting."""

    def advance(self, iteration: int, generator: torch.Generator) -> None:
        """Called after every optimiser step: an attack whose surrogates move during crafting moves them here."""

    def state_dict(self) -> dict[str, Any]:
        """What a resume in the middle of a restart needs of the attack besides its options and surrogates: the state
        of whatever `advance` moves (tensors, numbers and lists, as torch.load's weights_only reads them)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Go on from a `state_dict()`."""


_ATTACKS: dict[str, type[Attack]] = {}


def register_attack(name: str):
    """Class decorator: register an Attack subclass under `name` (its options and surrogate kind are checked)."""

    def register(cls: type[Attack]) -> type[Attack]:
        if not dataclasses.is_dataclass(cls.Options) or cls.surrogate not in SURROGATE_KINDS:
            raise TypeError(f"attack {name}: Options must be a dataclass and surrogate one of {SURROGATE_KINDS}")
        cls.name = name
        _ATTACKS[name] = cls
        return cls

    return register


def list_attacks() -> list[str]:
    return sorted(_ATTACKS)


def get_attack(name: str) -> type[Attack]:
    if name not in _ATTACKS:
        raise SanitizeError(unknown("attack", name, list_attacks()))
    return _ATTACKS[name]


def attack_options(name: str, **options: Any) -> Any:
    """The attack's options dataclass with `options` applied; an option it does not have is a clear error."""
    kind = get_attack(name).Options
    unknown = set(options) - {f.name for f in dataclasses.fields(kind)}
    if unknown:
        raise SanitizeError(f"{name} has no option(s) {', '.join(sorted(unknown))}")
    return kind(**options)


def parse_option(name: str, text: str) -> tuple[str, Any]:
    """'option=value' -> (option, value typed as the attack's option: bool, int, float or str)."""
    option, sep, value = text.partition("=")
    fields = {f.name: f for f in dataclasses.fields(get_attack(name).Options)}
    if not sep or option not in fields:
        raise SanitizeError(f"bad attack option {text!r}; use NAME=VALUE with NAME one of {', '.join(fields)}")
    kind = type(fields[option].default)
    try:
        if kind is bool:
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(value)
            return option, value.lower() in ("true", "1")
        if kind in (int, float, str):
            return option, kind(value)
    except ValueError:
        raise SanitizeError(f"attack option {option} must be {kind.__name__}, not {value!r}") from None
    raise SanitizeError(f"attack option {option} cannot be set from the command line")
