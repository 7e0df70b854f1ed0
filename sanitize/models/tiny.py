"""A two-layer ConvNet that trains in seconds: for tests and the demo."""

from torch import nn

from sanitize.models import register_model
from sanitize.models.base import Classifier


@register_model
def tiny(num_classes: int, in_shape: tuple[int, int, int], width: int = 16) -> Classifier:
    body = nn.Sequential(
        nn.Conv2d(in_shape[0], width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1, bias=False),
        nn.BatchNorm2d(2 * width),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    return Classifier(body, 2 * width, num_classes)
