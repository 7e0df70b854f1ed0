"""Scoring rules over the embeddings, one per file; each returns per-example scores, flags and a summary.

Every file has a functional core over plain arrays (testable on constructed data) and registers a detector
`name(embeddings, config, progress) -> Detection` that `sanitize scan --detector NAME` runs on a scan's embeddings.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sanitize.errors import SanitizeError


@dataclass
class Detection:
    """Scores in [0, 1] (higher = more suspicious), boolean flags, and what the rule wants to report."""

    scores: np.ndarray
    flags: np.ndarray
    summary: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


_DETECTORS: dict[str, Callable[..., Detection]] = {}


def register_detector(fn: Callable[..., Detection]) -> Callable[..., Detection]:
    _DETECTORS[fn.__name__] = fn
    return fn


def get_detector(name: str) -> Callable[..., Detection]:
    if name not in _DETECTORS:
        raise SanitizeError(f"unknown detector {name!r}; choose from {', '.join(sorted(_DETECTORS))}")
    return _DETECTORS[name]


def list_detectors() -> list[str]:
    return sorted(_DETECTORS)


from sanitize.detectors import activation_clustering, deep_knn, epic, knn_density, spectral_signatures  # noqa: E402,F401  (registers the rules)

__all__ = ["Detection", "get_detector", "list_detectors", "register_detector"]
