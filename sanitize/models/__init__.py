"""Model registry in the style of timm: `create_model(name, num_classes, in_shape)`; one family per file."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path

import torch

from sanitize.errors import SanitizeError
from sanitize.models.base import Classifier
from sanitize.wording import unknown

_REGISTRY: dict[str, Callable[..., Classifier]] = {}


def register_model(fn: Callable[..., Classifier]) -> Callable[..., Classifier]:
    """Decorator: make `fn(num_classes, in_shape, **kwargs)` available under its function name."""
    _REGISTRY[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def create_model(name: str, num_classes: int, in_shape: tuple[int, int, int] = (3, 32, 32), **kwargs) -> Classifier:
    if name not in _REGISTRY:
        raise SanitizeError(unknown("model", name, list_models()))
    return _REGISTRY[name](num_classes=num_classes, in_shape=in_shape, **kwargs)


def load_weights(model: Classifier, path: Path) -> None:
    """Load a state dict (or a training checkpoint holding one under "model") with weights_only=True; anything else,
    weights that do not fit the model, or non-finite weights are a one-line error."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise SanitizeError(
            f"cannot load checkpoint {path}: not a plain tensor state dict (refused by safe loading)"
        ) from None
    except Exception as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise SanitizeError(f"cannot load checkpoint {path}: {first_line}") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SanitizeError(f"checkpoint {path} is not a state dict of tensors")
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    reshaped = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or reshaped:
        parts = [
            f"{len(names)} {what} (first: {names[0]})"
            for what, names in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("keys of another shape", reshaped),
            )
            if names
        ]
        raise SanitizeError(f"checkpoint {path} does not fit the model: {'; '.join(parts)}")
    model.load_state_dict(state)
    require_finite_weights(model, f"checkpoint {path}")


def require_finite_weights(model: torch.nn.Module, what: str) -> None:
    """A model with NaN or infinite weights gives meaningless scores: refuse it, naming `what` holds them."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise SanitizeError(f"{what}: non-finite weights in {name}; no verdict")


def default_model_name(image_size: tuple[int, int]) -> str:
    """What `--model auto` means: a small ConvNet for images up to 64 px, an ImageNet ResNet-18 above."""
    return "convnet" if max(image_size) <= 64 else "resnet18"


def resolve_model_name(requested: str, image_size: tuple[int, int]) -> str:
    """The registry name `requested` stands for on images of `image_size` (auto: `default_model_name`)."""
    return default_model_name(image_size) if requested == "auto" else requested


from sanitize.models import convnet, resnet, tiny  # noqa: E402,F401  (registers the families)

__all__ = [
    "Classifier",
    "create_model",
    "default_model_name",
    "list_models",
    "load_weights",
    "register_model",
    "require_finite_weights",
    "resolve_model_name",
]
