"""ResNet-18: a CIFAR variant (3x3 stem, no max-pool, width parameter) and torchvision's ImageNet one."""

from torch import nn
from torchvision.models.resnet import BasicBlock
from torchvision.models.resnet import resnet18 as torchvision_resnet18

from sanitize.models import register_model
from sanitize.models.base import Classifier


def _stage(cin: int, cout: int, stride: int) -> nn.Sequential:
    downsample = None
    if stride != 1 or cin != cout:
        downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
    return nn.Sequential(BasicBlock(cin, cout, stride, downsample), BasicBlock(cout, cout))


@register_model
def resnet18_cifar(num_classes: int, in_shape: tuple[int, int, int], width: int = 64) -> Classifier:
    """ResNet-18 for 32x32 inputs as in the poisoning papers; width 16 is the cpu-scale variant."""
    w = width
    body = nn.Sequential(
        nn.Conv2d(in_shape[0], w, 3, padding=1, bias=False),
        nn.BatchNorm2d(w),
        nn.ReLU(inplace=True),
        _stage(w, w, 1),
        _stage(w, 2 * w, 2),
        _stage(2 * w, 4 * w, 2),
        _stage(4 * w, 8 * w, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    return Classifier(body, 8 * w, num_classes)


@register_model
def resnet18_cifar_w16(num_classes: int, in_shape: tuple[int, int, int]) -> Classifier:
    """The CIFAR ResNet-18 at a quarter of the width (0.7M parameters): trains and crafts at convnet speed on a CPU."""
    return resnet18_cifar(num_classes, in_shape, width=16)


@register_model
def resnet18(num_classes: int, in_shape: tuple[int, int, int]) -> Classifier:
    """torchvision's ImageNet ResNet-18 (random init, never downloaded weights) for images of 64 px and more."""
    net = torchvision_resnet18(weights=None)
    feature_dim = net.fc.in_features
    net.fc = nn.Identity()
    return Classifier(net, feature_dim, num_classes)
