"""The training recipe: its learning-rate schedules (step decay as torch's MultiStepLR, and one-cycle) and progressive
resizing."""

import dataclasses

import numpy as np
import pytest
import torch

from sanitize.cli import parse_scan_options
from sanitize.config import ScanConfig, TrainConfig
from sanitize.errors import SanitizeError
from sanitize.scanner import scan
from sanitize.trainer import train
from sanitize.training import learning_rate, milestone_epochs, resized, with_sign_noise
from sanitize.work import example_flops


@pytest.mark.parametrize("epochs", [1, 6, 8, 16, 30, 40])
def test_step_decay_is_multisteplr_epoch_by_epoch_to_the_last_bit(epochs):
    config = TrainConfig(epochs=epochs)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=config.lr)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestone_epochs(config), gamma=config.gamma)
    for epoch in range(epochs):
        for within in (0.0, 0.5, 0.999):
            assert learning_rate(config, epoch + within) == optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()


def test_one_cycle_rises_to_the_peak_over_the_first_quarter_then_falls_to_zero():
    config = TrainConfig(epochs=8, lr=0.2, schedule="onecycle")
    progress = np.linspace(0, 8, 801)
    rates = np.array([learning_rate(config, p) for p in progress])
    assert rates.argmax() == 200 and rates.max() == pytest.approx(0.2)
    assert rates[0] == 0 and rates[-1] == 0 and (rates >= 0).all()
    assert (np.diff(rates[:201]) > 0).all() and (np.diff(rates[200:]) < 0).all()
    assert learning_rate(config, 1.0) == pytest.approx(0.1) and learning_rate(config, 5.0) == pytest.approx(0.1)


def test_an_unknown_schedule_is_refused():
    with pytest.raises(SanitizeError, match="schedule must be step or onecycle"):
        ScanConfig.from_options(schedule="cosine")


def test_a_recipes_identity_leaves_out_the_options_it_does_not_use_so_cached_models_keep_their_names():
    unused = {"schedule", "reduced_side", "reduced_epochs", "noise_eps", "friendly_eps"}
    step, onecycle = TrainConfig(epochs=30), TrainConfig(epochs=30, schedule="onecycle")
    assert step.identity() == {k: v for k, v in dataclasses.asdict(step).items() if k not in unused}
    assert onecycle.identity() == step.identity() | {"schedule": "onecycle"}
    progressive = TrainConfig(epochs=30, reduced_side=16, reduced_epochs=20)
    assert progressive.identity() == step.identity() | {"reduced_side": 16, "reduced_epochs": 20}
    assert TrainConfig(epochs=30, noise_eps=16).identity() == step.identity() | {"noise_eps": 16}
    assert TrainConfig(epochs=30, friendly_eps=8).identity() == step.identity() | {"friendly_eps": 8}


def test_a_one_cycle_run_names_its_schedule_and_never_resumes_a_step_runs_checkpoint(tmp_path, digits_npz, capsys):
    options = dict(model="tiny", epochs=2, batch_size=64, augment=False)
    train(digits_npz, tmp_path / "step", **options)
    out = tmp_path / "onecycle"
    (tmp_path / "step").rename(out)  # a finished step run's checkpoint where the one-cycle run writes
    result = train(digits_npz, out, schedule="onecycle", **options)
    assert "another run's" in capsys.readouterr().err
    assert result.summary["config"]["train"]["schedule"] == "onecycle"
    assert [row["epoch"] for row in result.summary["model"]["history"]] == [1, 2]


def test_progressive_resizing_trains_the_first_epochs_reduced_and_the_scan_counts_their_smaller_flops(
    tmp_path, digits_npz
):
    options = dict(model="tiny", epochs=3, batch_size=64, quiet=True)
    plain = scan(digits_npz, tmp_path / "plain", **options)
    progressive = scan(digits_npz, tmp_path / "progressive", reduced_side=8, reduced_epochs=2, **options)
    history = progressive.summary["model"]["history"]
    assert [epoch.get("side") for epoch in history] == [8, 8, None]
    assert progressive.summary["config"]["train"]["reduced_side"] == 8
    size, classes = plain.summary["data"]["image_size"], len(plain.summary["data"]["classes"])
    full, reduced = example_flops("tiny", classes, (3, *size)), example_flops("tiny", classes, (3, 8, 8))
    assert tuple(size) == (16, 16) and reduced.train < full.train / 3  # a quarter of the pixels
    trained = [epoch["examples"] for epoch in history]
    expected = reduced.train * sum(trained[:2]) + full.train * trained[2] + full.score * len(progressive.flags)
    assert progressive.summary["work"]["flops"] == pytest.approx(expected)
    assert progressive.summary["work"]["flops"] < 0.6 * plain.summary["work"]["flops"]


def test_a_reduced_batch_keeps_its_aspect_and_memory_format():
    x = torch.rand(2, 3, 32, 48).contiguous(memory_format=torch.channels_last)
    out = resized(x, 16)
    assert out.shape == (2, 3, 16, 24) and out.is_contiguous(memory_format=torch.channels_last)
    assert out[0, 0, 0, 0] == pytest.approx(x[0, 0, :2, :2].mean())  # area averaging


@pytest.mark.parametrize(
    "options, message",
    [
        ({"reduced_side": 2, "reduced_epochs": 1}, "reduced_side must be >= 4"),
        ({"reduced_side": 16, "reduced_epochs": 8}, "fewer than epochs"),
        ({"reduced_side": 16}, "reduced_epochs must be >= 1"),
    ],
)
def test_progressive_resizing_that_cannot_work_is_refused(options, message):
    with pytest.raises(SanitizeError, match=message):
        ScanConfig.from_options(epochs=8, **options)


def test_scan_options_that_only_work_together_are_checked_as_a_set():
    """An evaluation's repeated --scan-option: progressive resizing needs both of its options at once."""
    assert parse_scan_options(["reduced_side=8", "reduced_epochs=2"]) == {"reduced_side": 8, "reduced_epochs": 2}
    with pytest.raises(SanitizeError, match="reduced_epochs must be >= 1"):
        parse_scan_options(["reduced_side=8"])


def test_sign_noise_moves_every_value_by_exactly_eps_either_way_reproducibly_in_the_batchs_memory_format():
    x = torch.rand(64, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    noisy = with_sign_noise(x, 16, torch.Generator().manual_seed(0))
    moved = (noisy - x) * 255
    assert torch.allclose(moved.abs(), torch.full_like(moved, 16.0), atol=1e-3)
    assert 0.45 < (moved > 0).float().mean() < 0.55  # each sign about half the time
    assert noisy.is_contiguous(memory_format=torch.channels_last)
    again = with_sign_noise(x, 16, torch.Generator().manual_seed(0))
    other = with_sign_noise(x, 16, torch.Generator().manual_seed(1))
    assert torch.equal(noisy, again) and not torch.equal(noisy, other)


def test_training_with_noise_sees_other_batches_names_its_noise_and_never_resumes_a_plain_runs_checkpoint(
    tmp_path, digits_npz, capsys
):
    options = dict(model="tiny", epochs=2, batch_size=64, augment=False, quiet=True)
    plain = train(digits_npz, tmp_path / "plain", **options)
    out = tmp_path / "noisy"
    (tmp_path / "plain").rename(out)  # a finished plain run's checkpoint where the noisy run writes
    noisy = train(digits_npz, out, noise_eps=16, **options)
    assert noisy.summary["config"]["train"]["noise_eps"] == 16
    # trained anew (a resumed plain checkpoint would repeat its losses): the same order, other pixels
    first = [row["loss"] for row in plain.summary["model"]["history"]]
    assert first != [row["loss"] for row in noisy.summary["model"]["history"]]
    with pytest.raises(SanitizeError, match="noise_eps must be in"):
        train(digits_npz, tmp_path / "bad", noise_eps=-1, **options)
