"""both_gates reads each proxy's verdict by the scan's own gate and takes proxies as MODEL=THRESHOLD."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
from both_gates import gate_of, parse_proxy

from sanitize.config import ScanConfig

CLOSED = {"closed_group": {"size": 40, "conductance": 0.05}}


@pytest.mark.parametrize(
    "flagged, alarmed, failed",
    [(10, False, False), (10, True, True), (60, False, True)],  # of 1,000 examples: 1%, 1% with an alarm, 6%
)
def test_a_proxy_fails_on_too_many_flags_or_an_alarmed_class(flagged, alarmed, failed):
    flags = np.arange(1000) < flagged
    per_class = {"0": {"alarmed": alarmed} | CLOSED, "1": {"alarmed": False, "closed_group": {}}}
    outcome = gate_of(flags, per_class, ScanConfig())
    assert outcome["failed"] is failed
    assert outcome["alarmed_classes"] == (["0"] if alarmed else [])
    assert outcome["closed_groups"] == {"0": [40, 0.05]}  # a class without a closed set has no entry
    assert gate_of(flags, per_class, ScanConfig(fail_on_class_alarm=False))["failed"] is (flagged == 60)


def test_a_proxy_is_a_model_and_its_threshold():
    assert parse_proxy("resnet18_cifar_w16=0.073") == ("resnet18_cifar_w16", 0.073)
    with pytest.raises(argparse.ArgumentTypeError):
        parse_proxy("convnet")
