"""The detection sweep measures today's default rule and scans each proxy in the evaluation's own folder, so the
sweep's verdicts and the victims' flags come from one proxy (reports/adaptive-attack, candidate 3)."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
from detection_sweep import CURRENT, Proxy, proxy_changes

from sanitize.config import ScanConfig
from sanitize.detectors import option_names
from sanitize.detectors.knn_density import KnnDensityOptions

CIFAR = SimpleNamespace(image_size=(32, 32))
DEFAULT = ScanConfig()
DEFAULT_PROXY = Proxy("convnet", DEFAULT.train.epochs, None, DEFAULT.train.schedule, None, DEFAULT.seed)


def test_current_is_todays_default_rule():
    assert dataclasses.asdict(KnnDensityOptions()) | CURRENT == dataclasses.asdict(KnnDensityOptions())


def test_the_default_proxy_changes_nothing():
    assert proxy_changes(CIFAR, DEFAULT_PROXY) == {}


@pytest.mark.parametrize(
    "change, options",
    [
        ({"model": "resnet18_cifar_w16"}, {"model": "resnet18_cifar_w16"}),
        ({"epochs": DEFAULT.train.epochs + 4}, {"epochs": DEFAULT.train.epochs + 4}),
        ({"schedule": "onecycle"}, {"schedule": "onecycle"}),
        ({"reduced": (16, 2)}, {"reduced_side": 16, "reduced_epochs": 2}),
        ({"seed": DEFAULT.seed + 1}, {"seed": DEFAULT.seed + 1}),
    ],
)
def test_a_proxy_change_is_a_scan_option_that_the_evaluation_files_as_a_proxy(change, options):
    changes = proxy_changes(CIFAR, DEFAULT_PROXY._replace(**change))
    assert changes == options
    ScanConfig.from_options(**changes)  # the names `sanitize scan` and the evaluation's --scan-option take
    # none a rule option: the evaluation files all of them as the proxy's (attacks.experiment.Harness.filtered), in
    # proxy_variant_folder(root, changes), the folder the sweep scans in
    assert not set(changes) & set(option_names("knn_density"))
