"""Attacks that craft real poisons against from-scratch training: a registry behind `craft(method, ...)`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

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
    """The method's config dataclass with `options` applied; an option the method does not have is a clear error."""
    kind = _lookup(method)[1]
    unknown = set(options) - {f.name for f in dataclasses.fields(kind)}
    if unknown:
        raise SanitizeError(f"{method} has no option(s) {', '.join(sorted(unknown))}")
    return kind(**options)


def parse_option(method: str, text: str) -> tuple[str, Any]:
    """'name=value' -> (name, value typed as the method's option: bool, int, float or str)."""
    name, sep, value = text.partition("=")
    fields = {f.name: f for f in dataclasses.fields(_lookup(method)[1])}
    if not sep or name not in fields:
        raise SanitizeError(f"bad attack option {text!r}; use NAME=VALUE with NAME one of {', '.join(fields)}")
    kind = type(fields[name].default)
    try:
        if kind is bool:
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(value)
            return name, value.lower() in ("true", "1")
        if kind in (int, float, str):
            return name, kind(value)
    except ValueError:
        raise SanitizeError(f"attack option {name} must be {kind.__name__}, not {value!r}") from None
    raise SanitizeError(f"attack option {name} cannot be set from the command line")


def craft(
    method: str, surrogates, train, target_image, setup: PoisonSetup, eps: float, config: Any, **kwargs: Any
) -> PoisonSet:
    """Craft poisons with `method` (see list_methods()) for the given setup."""
    return _lookup(method)[0](surrogates, train, target_image, setup, eps, config, **kwargs)


__all__ = [
    "PoisonSet",
    "PoisonSetup",
    "choose_setup",
    "craft",
    "list_methods",
    "load_poisons",
    "method_config",
    "read_manifest",
    "save_poisons",
    "write_poisoned",
]
