"""The small CIFAR ConvNet of the poisoning literature (widths w-2w-2w-4w, conv-BN-ReLU, max-pooling)."""

from torch import nn

from sanitize.models import register_model
from sanitize.models.base import Classifier


def _block(cin: int, cout: int, batch_norm: bool) -> list[nn.Module]:
    if not batch_norm:
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True)]
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


@register_model
def convnet(num_classes: int, in_shape: tuple[int, int, int], width: int = 32, batch_norm: bool = True) -> Classifier:
    w = width
    body = nn.Sequential(
        *_block(in_shape[0], w, batch_norm),
        *_block(w, 2 * w, batch_norm),
        nn.MaxPool2d(2),
        *_block(2 * w, 2 * w, batch_norm),
        nn.MaxPool2d(2),
        *_block(2 * w, 4 * w, batch_norm),
        nn.MaxPool2d(2),
        *_block(4 * w, 4 * w, batch_norm),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    return Classifier(body, 4 * w, num_classes)


@register_model
def convnet_nobn(num_classes: int, in_shape: tuple[int, int, int], width: int = 32) -> Classifier:
    """The same ConvNet without batch norm, as the gradient-matching reference's ConvNet (trained there at lr 0.01)."""
    return convnet(num_classes, in_shape, width, batch_norm=False)
