"""Friendly noise: as large as the model tolerates, within its bound, reproducible, resumable, and counted."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sanitize.config import TrainConfig
from sanitize.data import open_dataset
from sanitize.errors import SanitizeError
from sanitize.friendly import BATCH_SIZE, STEPS, FriendlyNoise, friendly_epoch
from sanitize.models import create_model
from sanitize.trainer import train
from sanitize.training import train_model
from sanitize.work import example_flops

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def fitted(digits_npz):
    """A tiny model fitted to 600 digits, and those digits."""
    data = open_dataset(digits_npz, progress=False).subset(np.arange(600))
    torch.manual_seed(0)
    model = create_model("tiny", 10, (3, 16, 16))
    train_model(model, data, np.arange(600), TrainConfig(epochs=3, batch_size=64), CPU, None, progress=False)
    return model.eval(), data


def found(fitted, path, positions):
    model, data = fitted
    noise = FriendlyNoise(path, data, eps=16)
    noise.generate(model, data, positions, CPU, None, seed=0, progress=False)
    return noise


def test_the_noise_stays_in_its_bound_and_moves_the_model_far_less_than_random_noise_at_that_bound(fitted, tmp_path):
    model, data = fitted
    positions = np.arange(600)
    noise = found(fitted, tmp_path / "f.npy", positions)
    levels = np.load(tmp_path / "f.npy")
    assert levels.dtype == np.int8 and levels.shape == (600, 16, 16, 3)
    # within +-16 and about the size of its uniform +-8 start (mean 4 levels): the reference's size term is weak
    # beside its KL term, so the noise keeps its start's size and loses what moves the model
    assert np.abs(levels).max() <= 16 and np.abs(levels).mean() > 3.5
    images, _, where = data.load_batch(positions)
    x = images.float().div(255)

    def moved(changed: torch.Tensor) -> float:
        with torch.no_grad():
            before, after = F.log_softmax(model(x), 1), F.log_softmax(model(changed), 1)
        return float(F.kl_div(after, before, reduction="batchmean", log_target=True))

    signs = torch.randint(0, 2, x.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert moved(noise.added(x, where)) < moved(x + signs * 16 / 255) / 10


def test_a_generation_killed_after_a_batch_resumes_to_the_same_noise(fitted, tmp_path):
    positions = np.arange(600)
    whole = np.load(found(fitted, tmp_path / "whole.npy", positions).path)
    killed = tmp_path / "killed.npy"
    found(fitted, killed, positions)
    left = np.lib.format.open_memmap(killed, mode="r+")
    left[BATCH_SIZE:] = 0  # what a kill after the first batch leaves
    left.flush()
    del left
    killed.with_suffix(".json").write_text(json.dumps({"batches_done": 1, "eps": 16}))
    noise = found(fitted, killed, positions)
    assert noise.complete(positions) and np.array_equal(np.load(killed), whole)


def test_training_with_friendly_noise_finds_it_once_counts_its_passes_and_leaves_no_file(tmp_path, digits_npz):
    options = dict(model="tiny", epochs=4, batch_size=64, quiet=True)
    plain = train(digits_npz, tmp_path / "plain", **options)
    friendly = train(digits_npz, tmp_path / "friendly", friendly_eps=16, noise_eps=16, **options)
    history = friendly.summary["model"]["history"]
    size = friendly.summary["data"]["examples"]
    at = friendly_epoch(TrainConfig(epochs=4))
    assert [epoch.get("friendly_passes", 0) for epoch in history] == [STEPS * size if e == at else 0 for e in range(4)]
    flops = example_flops("tiny", 10, (3, 16, 16)).train
    extra = friendly.summary["work"]["flops"] - plain.summary["work"]["flops"]
    assert extra == pytest.approx(flops * STEPS * size)
    assert friendly.summary["config"]["train"]["friendly_eps"] == 16
    assert not list((tmp_path / "friendly").rglob("*friendly*"))  # the noise is removed with the run
    assert friendly.summary["train_accuracy"] > 0.3  # far above chance (0.1): it still learns


def test_friendly_noise_out_of_range_is_refused(digits_npz, tmp_path):
    with pytest.raises(SanitizeError, match="friendly_eps must be in"):
        train(digits_npz, tmp_path / "bad", model="tiny", epochs=1, friendly_eps=300, quiet=True)
