"""`sanitize attack` (attacks.api): a killed craft resumes to the same poisoned copy, and the options that train
models on the current poisons work on .npz data and are a one-line error, before any training, on a folder."""

import numpy as np
import pytest
from click.testing import CliRunner

from attacks import get_attack
from attacks.api import attack_dataset
from sanitize.cli import cli

QUICK = dict(key=2, budget=0.02, model="tiny", epochs=1, iterations=2, progress=False)


def test_a_killed_craft_resumes_to_the_same_poisoned_copy(tmp_path, split_npz, monkeypatch):
    train, test = split_npz
    attack_dataset(train, test, tmp_path / "straight", restarts=2, **QUICK)
    attack, calls = get_attack("gradient-matching"), []
    real_loss = attack.loss

    def counted(self, *args, **kwargs):
        calls.append(1)
        if dying and len(calls) == 3:  # the second restart's first iteration (one batch a step)
            raise KeyboardInterrupt
        return real_loss(self, *args, **kwargs)

    monkeypatch.setattr(attack, "loss", counted)
    dying = True
    with pytest.raises(KeyboardInterrupt):
        attack_dataset(train, test, tmp_path / "killed", restarts=2, **QUICK)
    assert len(list((tmp_path / "killed" / "surrogates").glob("craft-*.partial.pt"))) == 1
    calls.clear()
    dying = False
    attack_dataset(train, test, tmp_path / "killed", restarts=2, **QUICK)
    assert len(calls) == 2  # the second restart only
    assert not list((tmp_path / "killed" / "surrogates").glob("craft-*.partial.pt"))
    straight, resumed = (
        np.load(tmp_path / run / "data.npz", allow_pickle=False)["x"] for run in ("straight", "killed")
    )
    assert np.array_equal(straight, resumed)


def test_models_trained_on_the_current_poisons_need_npz_data(tmp_path, split_npz, digits_folder):
    train, test = split_npz
    attack_dataset(train, test, tmp_path / "p", restarts=1, retrain_every=1, **QUICK)
    assert len(list((tmp_path / "p" / "surrogates").glob("surrogate-retrained-*.pt"))) == 1
    result = CliRunner().invoke(
        cli,
        ["attack", str(digits_folder), "--test", str(test), "--out", str(tmp_path / "f"), "--craft-option",
         "evade=1.0", "--craft-option", "evade_space=proxy", "--model", "tiny", "--quiet"],
    )  # fmt: skip
    assert result.exit_code == 2 and "need .npz data" in result.output
    assert not (tmp_path / "f").exists()
