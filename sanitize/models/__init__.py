"""Model registry in the style of timm: `create_model(name, num_classes, in_shape)`; one family per file."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from sanitize.errors import SanitizeError
from sanitize.models.base import Classifier

_REGISTRY: dict[str, Callable[..., Classifier]] = {}


def register_model(fn: Callable[..., Classifier]) -> Callable[..., Classifier]:
    """Decorator: make `fn(num_classes, in_shape, **kwargs)` available under its function name."""
    _REGISTRY[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def create_model(name: str, num_classes: int, in_shape: tuple[int, int, int] = (3, 32, 32), **kwargs) -> Classifier:
    if name not in _REGISTRY:
        raise SanitizeError(f"unknown model {name!r}; choose from {', '.join(list_models())}")
    return _REGISTRY[name](num_classes=num_classes, in_shape=in_shape, **kwargs)


def load_weights(model: Classifier, path: Path) -> None:
    """Load a state dict (or a training checkpoint holding one under "model") with weights_only=True."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise SanitizeError(f"cannot load checkpoint {path}: {error}") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise SanitizeError(f"checkpoint {path} does not fit the model: {first_line}") from None


def default_model_name(image_size: tuple[int, int]) -> str:
    """The proxy used when `--model auto`: a small ConvNet for small images, an ImageNet ResNet-18 otherwise."""
    return "convnet" if max(image_size) <= 64 else "resnet18"


from sanitize.models import convnet, resnet, tiny  # noqa: E402,F401  (registers the families)

__all__ = ["Classifier", "create_model", "default_model_name", "list_models", "load_weights", "register_model"]
