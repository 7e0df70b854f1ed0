"""The training recipe's learning-rate schedules: step decay as torch's MultiStepLR, and one-cycle."""

import dataclasses

import numpy as np
import pytest
import torch

from sanitize.config import ScanConfig, TrainConfig
from sanitize.errors import SanitizeError
from sanitize.trainer import train
from sanitize.training import learning_rate, milestone_epochs


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


def test_a_step_recipes_identity_leaves_the_schedule_out_so_cached_models_keep_their_names():
    step, onecycle = TrainConfig(epochs=30), TrainConfig(epochs=30, schedule="onecycle")
    assert "schedule" not in step.identity() and step.identity() == {
        k: v for k, v in dataclasses.asdict(step).items() if k != "schedule"
    }
    assert onecycle.identity() == dataclasses.asdict(onecycle) != step.identity() | {"schedule": "step"}


def test_a_one_cycle_run_names_its_schedule_and_never_resumes_a_step_runs_checkpoint(tmp_path, digits_npz, capsys):
    options = dict(model="tiny", epochs=2, batch_size=64, augment=False)
    train(digits_npz, tmp_path / "step", **options)
    out = tmp_path / "onecycle"
    (tmp_path / "step").rename(out)  # a finished step run's checkpoint where the one-cycle run writes
    result = train(digits_npz, out, schedule="onecycle", **options)
    assert "another run's" in capsys.readouterr().err
    assert result.summary["config"]["train"]["schedule"] == "onecycle"
    assert [row["epoch"] for row in result.summary["model"]["history"]] == [1, 2]
