"""Scoring rules over the embeddings, one per file; each returns per-example scores, flags and a summary.

Every file has a functional core over plain arrays (testable on constructed data), an options dataclass with its own
defaults and checks, and registers a detector `name(embeddings, options, context) -> Detection` that
`sanitize scan --detector NAME` runs on a scan's embeddings. A new detector is one new file imported below.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sanitize.errors import SanitizeError
from sanitize.wording import unknown

EMBEDDINGS = ("features", "gradient", "logit_gradient")  # the spaces a detector may work in (Embeddings.space)


@dataclass
class Detection:
    """Scores in [0, 1] (higher = more suspicious), boolean flags, and what the rule wants to report."""

    scores: np.ndarray
    flags: np.ndarray
    summary: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class DetectorContext:
    """What every detector may use of the scan besides its own options: the neighbour index and the seed."""

    index: str = "auto"  # auto | flat | ivf | hnsw
    exact_max: int = 50_000  # classes up to this size use the exact index under auto
    seed: int = 0
    progress: bool = True


@dataclass(frozen=True)
class _Entry:
    run: Callable[..., Detection]
    options: type


_DETECTORS: dict[str, _Entry] = {}


def register_detector(options: type) -> Callable[[Callable[..., Detection]], Callable[..., Detection]]:
    """Register `fn(embeddings, options, context)` under its name, with `options` its options dataclass."""

    def register(fn: Callable[..., Detection]) -> Callable[..., Detection]:
        _DETECTORS[fn.__name__] = _Entry(fn, options)
        return fn

    return register


def _entry(name: str) -> _Entry:
    if name not in _DETECTORS:
        raise SanitizeError(unknown("detector", name, list_detectors()))
    return _DETECTORS[name]


def get_detector(name: str) -> Callable[..., Detection]:
    return _entry(name).run


def list_detectors() -> list[str]:
    return sorted(_DETECTORS)


def options_class(name: str) -> type:
    return _entry(name).options


def option_names(name: str) -> set[str]:
    return {f.name for f in dataclasses.fields(options_class(name))}


def detector_options(name: str, **values: Any) -> Any:
    """`name`'s options with `values` applied, checked: an option it does not have is a clear error."""
    unknown = set(values) - option_names(name)
    if unknown:
        raise SanitizeError(f"detector {name} has no option(s) {', '.join(sorted(unknown))}")
    options = options_class(name)(**values)
    check = getattr(options, "validate", None)
    if check is not None:
        check()
    return options


def run_detector(name: str, embeddings: Any, options: Any, context: DetectorContext = DetectorContext()) -> Detection:
    return get_detector(name)(embeddings, options, context)


def check(conditions: list[tuple[bool, str]]) -> None:
    """Raise the message of the first condition that does not hold (the options' validate methods)."""
    for ok, message in conditions:
        if not ok:
            raise SanitizeError(message)


from sanitize.detectors import (  # noqa: E402, F401  (registers the rules)
    activation_clustering,
    deep_knn,
    epic,
    knn_density,
    spectral_signatures,
)

__all__ = [
    "Detection",
    "DetectorContext",
    "detector_options",
    "get_detector",
    "list_detectors",
    "option_names",
    "options_class",
    "register_detector",
    "run_detector",
]
