"""The small CIFAR ConvNet of the poisoning literature (widths w-2w-2w-4w, conv-BN-ReLU, max-pooling)."""

from torch import nn

from sanitize.models import register_model
from sanitize.models.base import Classifier


def _block(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


@register_model
def convnet(num_classes: int, in_shape: tuple[int, int, int], width: int = 32) -> Classifier:
    w = width
    body = nn.Sequential(
        *_block(in_shape[0], w),
        *_block(w, 2 * w),
        nn.MaxPool2d(2),
        *_block(2 * w, 2 * w),
        nn.MaxPool2d(2),
        *_block(2 * w, 4 * w),
        nn.MaxPool2d(2),
        *_block(4 * w, 4 * w),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    return Classifier(body, 4 * w, num_classes)
