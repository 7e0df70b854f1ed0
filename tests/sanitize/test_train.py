"""`sanitize train`: plain and robust (EPIC) training, the drop log, the cap, and resume after a kill."""

import json
import os
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from sanitize.cli import cli
from sanitize.config import TrainConfig
from sanitize.data import open_dataset
from sanitize.embeddings import compute_embeddings
from sanitize.models import create_model
from sanitize.robust import EpicDropper
from sanitize.trainer import train
from sanitize.training import train_model

FAST = dict(model="tiny", epochs=6, batch_size=32, augment=False, quiet=True)


def test_robust_training_drops_the_planted_examples_and_logs_every_drop(tmp_path, mislabeled_npz):
    data, planted = mislabeled_npz
    result = train(data, tmp_path / "r", robust=True, every=2, **FAST)
    log = json.loads(result.files["drop_log"].read_text())
    positions = [row["position"] for row in log["dropped"]]
    assert log["rounds"] == [2, 4] and {row["round"] for row in log["dropped"]} <= {
        2,
        4,
    }  # milestones of 6 epochs: 2, 4, 5
    assert len(positions) == len(set(positions)) <= log["cap"] == 100
    assert np.isin(planted, positions).mean() >= 0.5
    kept = result.files["kept"].read_text().split()
    assert len(kept) + len(positions) == 1000 and not set(kept) & {row["id"] for row in log["dropped"]}
    assert sum(result.summary["robust"]["dropped_per_class"].values()) == len(positions)
    assert result.summary["kind"] == "robust-train"
    labels = np.load(data)["y"]
    assert all(labels[row["position"]] == row["class"] for row in log["dropped"])
    html = result.files["report"].read_text(encoding="utf-8")
    assert f"<strong>{len(positions)}</strong> examples" in html and html.count("<figure") == min(len(positions), 48)


def test_the_cap_bounds_what_is_dropped(tmp_path, mislabeled_npz):
    data, _ = mislabeled_npz
    result = train(data, tmp_path / "r", robust=True, every=2, max_dropped_fraction=0.005, **FAST)
    assert len(result.dropped_ids) == 5


def test_a_killed_robust_run_resumes_to_the_same_drops(tmp_path, mislabeled_npz, monkeypatch):
    data, _ = mislabeled_npz
    reference = train(data, tmp_path / "whole", robust=True, every=2, **FAST)
    original = EpicDropper.__call__

    def killed_after_second_round(self, epoch, model, indices):
        survivors = original(self, epoch, model, indices)
        if epoch == 3:  # the round-4 drops are logged, the epoch's checkpoint is not yet written
            raise KeyboardInterrupt
        return survivors

    monkeypatch.setattr(EpicDropper, "__call__", killed_after_second_round)
    with pytest.raises(KeyboardInterrupt):
        train(data, tmp_path / "killed", robust=True, every=2, **FAST)
    monkeypatch.setattr(EpicDropper, "__call__", original)
    resumed = train(data, tmp_path / "killed", robust=True, every=2, **FAST)
    assert resumed.summary["model"]["trained_epochs"] == 6
    assert (
        json.loads(resumed.files["drop_log"].read_text())["dropped"]
        == json.loads(reference.files["drop_log"].read_text())["dropped"]
    )
    assert not list((tmp_path / "killed").glob("*.proxy.npy"))  # each round's gradient proxy file is removed after it


def test_plain_training_from_the_cli_writes_a_weights_only_checkpoint(tmp_path, digits_npz):
    result = CliRunner().invoke(
        cli,
        [
            "train",
            str(digits_npz),
            "--out",
            str(tmp_path / "t"),
            "--model",
            "tiny",
            "--epochs",
            "1",
            "--test",
            str(digits_npz),
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    model = create_model("tiny", 10, (3, 16, 16))
    model.load_state_dict(torch.load(tmp_path / "t" / "model.pt", weights_only=True))
    summary = json.loads((tmp_path / "t" / "summary.json").read_text())
    assert (
        summary["robust"] is None
        and summary["kind"] == "train"
        and 0 <= summary["test_accuracy"] <= 1
        and not (tmp_path / "t" / "drop_log.json").exists()
    )
    bad = CliRunner().invoke(
        cli, ["train", str(digits_npz), "--out", str(tmp_path / "u"), "--robust", "--fraction", "0", "--quiet"]
    )
    assert bad.exit_code == 2 and "fraction" in bad.output


def test_training_records_skipped_files_like_a_scan(tmp_path, digits_folder):
    (digits_folder / "digit_1" / "broken.png").write_bytes(b"not a png")
    os.mkfifo(digits_folder / "digit_2" / "pipe.png")
    result = train(digits_folder, tmp_path / "t", model="tiny", epochs=1, robust=True, quiet=True)
    skipped = {s["id"]: s["reason"] for s in result.summary["data"]["skipped"]}
    assert (
        set(skipped) == {"digit_1/broken.png", "digit_2/pipe.png"}
        and skipped["digit_2/pipe.png"] == "not a regular file"
    )
    html = (tmp_path / "t" / "report.html").read_text(encoding="utf-8")
    assert "digit_2/pipe.png" in html and "not a regular file" in html
    # its epochs read the images from a decoded copy, removed when the run ended
    assert any("decoded images kept" in note for note in result.summary["data"]["notes"])
    assert not list((tmp_path / "t" / "decoded").iterdir())


def test_a_training_run_and_the_embedding_pass_say_roughly_how_long_they_will_take(digits_npz, capsys, tmp_path):
    data = open_dataset(digits_npz)
    model = create_model("tiny", 10, (3, 16, 16))
    config = TrainConfig(epochs=3, batch_size=16, augment=False)
    train_model(model, data, np.arange(320), config, torch.device("cpu"), None, progress=True, desc="proxy")
    lines = [line for line in capsys.readouterr().err.splitlines() if "proxy: about" in line]
    assert len(lines) == 1 and re.fullmatch(r"proxy: about \d+(\.\d)? (s|min|h) for 3 epochs", lines[0].strip())
    train_model(model, data, np.arange(320), config, torch.device("cpu"), None, progress=False, desc="proxy")
    assert "about" not in capsys.readouterr().err  # quiet runs say nothing
    compute_embeddings(model, data, tmp_path / "embeddings", torch.device("cpu"), None, batch_size=16)
    lines = [line for line in capsys.readouterr().err.splitlines() if "embed: about" in line]
    assert len(lines) == 1 and re.fullmatch(
        rf"embed: about \d+(\.\d)? (s|min|h) for {len(data)} images", lines[0].strip()
    )
