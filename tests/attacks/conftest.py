"""What the attacks' smoke tests share (attacks.smoke): digits split into a train and a test set, a tiny victim
trained from scratch with the smoke recipe (`tiny_victim`), and the margin a poisoned training set gives a target next
to random noise of the same size (`noise_margins`)."""

from __future__ import annotations

import pytest

from attacks.smoke import digits_split, margins_against_noise, train_tiny


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
