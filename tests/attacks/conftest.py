"""What the attacks' smoke tests share (attacks.smoke): digits split into a train and a test set, a tiny victim
trained from scratch with the smoke recipe (`tiny_victim`), and the margin a poisoned training set gives a target next
to random noise of the same size (`noise_margins`)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from attacks.evaluate_transfer import run_transfer_evaluation
from attacks.smoke import digits_split, margins_against_noise, train_tiny
from attacks.transfer import TransferConfig


@pytest.fixture(scope="module")
def split():
    """Digits as a train set (1,500) and a test set (297)."""
    return digits_split()


@pytest.fixture(scope="session")
def tiny_victim():
    return train_tiny


@pytest.fixture(scope="session")
def noise_margins():
    return margins_against_noise


@pytest.fixture
def digits_transfer(tmp_path):
    """Runs the transfer evaluation on digits written as npz with a tiny extractor (options override the smoke
    defaults); returns its rows and the output folder."""

    def run(**options):
        train, test = digits_split()
        np.savez(tmp_path / "train.npz", x=train.images, y=train.labels)
        np.savez(tmp_path / "test.npz", x=test.images, y=test.labels)
        smoke = {"victims": 1, "eps": 16, "extractor": "tiny", "pool_per_class": 60, "finetune_per_class": 30}
        config = TransferConfig(**smoke | options)
        out = run_transfer_evaluation(tmp_path / "train.npz", tmp_path / "test.npz", tmp_path / "out", config)
        return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()], out

    return run


@pytest.fixture
def split_npz(tmp_path, digits16):
    """Digits written as npz: a train set (1,500) and a test set (297)."""
    x, y = digits16
    np.savez(tmp_path / "train.npz", x=x[:1500], y=y[:1500])
    np.savez(tmp_path / "test.npz", x_test=x[1500:], y_test=y[1500:])
    return tmp_path / "train.npz", tmp_path / "test.npz"
