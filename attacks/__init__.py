"""Attacks that craft real poisons against from-scratch training: a registry behind `craft(method, ...)`."""

from __future__ import annotations

from typing import Any, Callable

from attacks.base import PoisonSet, PoisonSetup, choose_setup, load_poisons, save_poisons, write_poisoned
from attacks.gradient_matching import GradientMatchingConfig, craft_gradient_matching
from sanitize.errors import SanitizeError
from sanitize.manifest import read_manifest

_METHODS: dict[str, tuple[Callable[..., PoisonSet], type]] = {
    "gradient-matching": (craft_gradient_matching, GradientMatchingConfig),
}


def list_methods() -> list[str]:
    return sorted(_METHODS)


def _lookup(method: str) -> tuple[Callable[..., PoisonSet], type]:
    if method not in _METHODS:
        raise SanitizeError(f"unknown attack {method!r}; choose from {', '.join(list_methods())}")
    return _METHODS[method]


def method_config(method: str, **options: Any) -> Any:
    """The method's config dataclass with `options` applied."""
    return _lookup(method)[1](**options)


def craft(method: str, surrogates, train, target_image, setup: PoisonSetup, eps: float, config: Any, **kwargs: Any) -> PoisonSet:
    """Craft poisons with `method` (see list_methods()) for the given setup."""
    return _lookup(method)[0](surrogates, train, target_image, setup, eps, config, **kwargs)


__all__ = ["PoisonSet", "PoisonSetup", "choose_setup", "craft", "list_methods", "load_poisons", "method_config", "read_manifest", "save_poisons", "write_poisoned"]
