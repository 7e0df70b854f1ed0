"""The CLI's torch-free registry names match the registries, and a typo in any of them names the nearest value."""

import pytest
from click.testing import CliRunner

from attacks.registry import list_attacks
from sanitize.cli import cli
from sanitize.models import list_models
from sanitize.names import ATTACKS, MODELS


def test_the_names_are_the_registries():
    assert list(MODELS) == list_models()
    assert list(ATTACKS) == list_attacks()


@pytest.mark.parametrize(
    "args, hint",
    [
        (["scan", ".", "--model", "convnt"], "did you mean convnet?"),
        (["scan", ".", "--device", "cdua"], "did you mean cuda?"),
        (["scan", ".", "--detector", "deep_nn"], "did you mean deep_knn?"),
        (["train", ".", "--model", "resnet19"], "did you mean resnet18?"),
        (["attack", ".", "--test", ".", "--method", "gradient-matchin"], "did you mean gradient-matching?"),
        (["evaluate", ".", "--test", ".", "--out", "o", "--scale", "ful"], "did you mean full?"),
    ],
)
def test_a_typo_is_a_usage_error_naming_the_nearest_value(args, hint):
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and hint in result.output


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1", "mps"])
def test_every_device_form_is_accepted(device):
    from sanitize.cli import Device

    assert Device().convert(device, None, None) == device
