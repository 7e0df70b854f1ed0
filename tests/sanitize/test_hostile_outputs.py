"""Hostile checkpoints, output folders and resume state: a one-line error (exit 2) or a redone step, and never a
passing verdict left behind by a run that failed."""

import fcntl
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import sanitize
from sanitize import scanner
from sanitize.cli import cli
from sanitize.data import OUTPUT_LOCK
from sanitize.errors import SanitizeError
from sanitize.manifest import poison_mask, read_manifest
from sanitize.models import create_model

FAST = {"model": "tiny", "epochs": 1, "batch_size": 16, "augment": False, "quiet": True}
FAST_ARGS = ["--model", "tiny", "--epochs", "1", "--batch-size", "16", "--no-augment", "--quiet"]


class Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def _invoke(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    lines = [line for line in result.output.splitlines() if line.strip()]
    return result.exit_code, lines


def test_non_finite_weights_are_refused_and_leave_no_verdict(tmp_path, digits_npz):
    passed = sanitize.scan(digits_npz, tmp_path / "o", **FAST)  # an earlier passing run in the same folder
    assert (tmp_path / "o" / "summary.json").exists() and passed.summary["gate"]
    model = create_model("tiny", 10, (3, 16, 16))
    state = model.state_dict()
    state["head.weight"][0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    code, lines = _invoke("scan", digits_npz, "--out", tmp_path / "o", "--checkpoint", tmp_path / "nan.pt", *FAST_ARGS)
    assert code == 2 and len(lines) == 1 and "non-finite weights in head.weight" in lines[0]
    assert not (tmp_path / "o" / "summary.json").exists()  # the old verdict did not survive the failed run ...
    assert not (tmp_path / "o" / "report.html").exists()  # ... nor its report


def test_a_checkpoint_that_is_not_plain_tensors_is_one_line_without_torchs_advice(tmp_path, digits_npz):
    (tmp_path / "evil.pt").write_bytes(pickle.dumps(Exploit()))
    torch.save({"head.weight": torch.zeros(2), "note": "text"}, tmp_path / "mixed.pt")
    for name, message in (("evil.pt", "not a plain tensor state dict"), ("mixed.pt", "not a state dict of tensors")):
        code, lines = _invoke(
            "scan", digits_npz, "--out", tmp_path / "out", "--checkpoint", tmp_path / name, *FAST_ARGS
        )
        assert code == 2 and len(lines) == 1 and message in lines[0], lines
        assert "weights_only" not in lines[0]


def test_a_checkpoint_of_another_architecture_names_what_differs(tmp_path, digits_npz):
    torch.save(create_model("convnet", 10, (3, 16, 16)).state_dict(), tmp_path / "convnet.pt")
    with pytest.raises(SanitizeError, match=r"missing keys \(first: .*\); \d+ unexpected keys \(first: body"):
        sanitize.scan(digits_npz, tmp_path / "o", checkpoint=str(tmp_path / "convnet.pt"), **FAST)
    torch.save(create_model("tiny", 3, (3, 16, 16)).state_dict(), tmp_path / "three.pt")
    with pytest.raises(SanitizeError, match=r"keys of another shape \(first: head"):
        sanitize.scan(digits_npz, tmp_path / "p", checkpoint=str(tmp_path / "three.pt"), **FAST)


def test_the_verdict_is_written_last(tmp_path, digits_npz, monkeypatch):
    def broken_report(*args, **kwargs):
        raise RuntimeError("the report failed")

    monkeypatch.setattr(scanner, "write_report", broken_report)
    with pytest.raises(RuntimeError):
        sanitize.scan(digits_npz, tmp_path / "o", **FAST)
    assert not (tmp_path / "o" / "summary.json").exists()


def test_output_folders_that_cannot_work_are_one_line_errors(tmp_path, digits_npz, digits_folder):
    (tmp_path / "file").write_text("a regular file")
    nested_out = digits_folder.parent
    for out, message in (
        (tmp_path / "file" / "out", "cannot write the output folder"),
        ("/proc/sanitize-out", "cannot write the output folder"),
        (nested_out, "is inside the output folder"),
    ):
        data = digits_folder if out == nested_out else digits_npz
        code, lines = _invoke("scan", data, "--out", out, *FAST_ARGS)
        assert code == 2 and len(lines) == 1 and message in lines[0], (out, lines)


@pytest.mark.parametrize("command", ["scan", "train"])
def test_a_second_run_writing_to_a_busy_output_folder_is_a_one_line_error(tmp_path, digits_npz, command):
    out = tmp_path / "out"
    out.mkdir()
    with open(out / OUTPUT_LOCK, "w") as held:  # what a run writing there holds
        fcntl.flock(held, fcntl.LOCK_EX)
        code, lines = _invoke(command, digits_npz, "--out", out, *FAST_ARGS)
        assert code == 2 and len(lines) == 1 and "another run is writing to" in lines[0], lines
        assert (out / OUTPUT_LOCK).exists() and sorted(p.name for p in out.iterdir()) == [OUTPUT_LOCK]
    sanitize.scan(digits_npz, out, **FAST)  # once it is free, a run writes there and leaves no lock behind
    assert (out / "summary.json").exists() and not (out / OUTPUT_LOCK).exists()
    assert "examples trained on" in (out / "report.html").read_text()  # the scan's model work


def test_damaged_resume_state_is_redone(tmp_path, digits_npz):
    first = sanitize.scan(digits_npz, tmp_path / "o", **(FAST | {"epochs": 2}))
    (tmp_path / "o" / "proxy" / "checkpoint.pt").write_bytes(b"\0garbage")
    (tmp_path / "o" / "embeddings" / "meta.json").write_text("{broken")
    (tmp_path / "o" / "embeddings" / "progress.json").write_text("[]")
    again = sanitize.scan(digits_npz, tmp_path / "o", **(FAST | {"epochs": 2}))
    assert again.passed == first.passed and len(again.scores) == len(first.scores)
    assert json.loads((tmp_path / "o" / "embeddings" / "meta.json").read_text())["rows"] == len(first.scores)


def test_a_closed_pipe_ends_quietly_with_the_verdicts_exit_code(tmp_path, digits_npz):
    command = [sys.executable, "-m", "sanitize", "scan", str(digits_npz), "--out", str(tmp_path / "o"), *FAST_ARGS]
    process = subprocess.run(
        f"{' '.join(command)} | head -1; exit ${{PIPESTATUS[0]}}",
        shell=True,
        executable="/bin/bash",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert process.returncode in (0, 1), process.stderr
    assert "Traceback" not in process.stderr and "BrokenPipe" not in process.stderr
    assert process.stdout.startswith("data ")


@pytest.mark.parametrize(
    "content, message",
    [
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        (
            json.dumps({"method": "x", "eps": 8, "target_class": 0, "intended_class": 1, "poison_ids": [{"a": 1}]}),
            "strings or integers",
        ),
        (
            json.dumps(
                {
                    "method": "x",
                    "eps": 8,
                    "target_class": 0,
                    "intended_class": 1,
                    "poison_ids": ["0"],
                    "poison_indices": [-1],
                }
            ),
            "non-negative",
        ),
    ],
    ids=["deep", "object ids", "negative positions"],
)
def test_hostile_manifests_are_clear_errors(tmp_path, content, message):
    (tmp_path / "poison_manifest.json").write_text(content)
    with pytest.raises(SanitizeError, match=message):
        read_manifest(tmp_path)


def test_manifest_positions_beyond_the_data_are_refused():
    record = {"poison_ids": ["0"], "poison_indices": [5000]}
    with pytest.raises(SanitizeError, match="go up to 5000"):
        poison_mask(record, ["0", "1"])


def test_a_failed_run_removes_the_output_folder_it_created_empty(tmp_path):
    (tmp_path / "data" / "a").mkdir(parents=True)
    (tmp_path / "data" / "a" / "notes.txt").write_text("no images here")
    with pytest.raises(SanitizeError, match="no image files"):
        sanitize.scan(tmp_path / "data", tmp_path / "out", **FAST)
    assert not (tmp_path / "out").exists()
    (tmp_path / "kept").mkdir()  # a folder that was there before the run stays
    with pytest.raises(SanitizeError):
        sanitize.scan(tmp_path / "data", tmp_path / "kept", **FAST)
    assert (tmp_path / "kept").is_dir()


def test_a_resumed_training_says_so(tmp_path, digits_npz, capsys):
    from sanitize.config import TrainConfig
    from sanitize.data import open_dataset
    from sanitize.training import train_model

    data = open_dataset(digits_npz)
    recipe = TrainConfig(epochs=2, batch_size=128, augment=False)

    def dies_in_the_second_epoch(epoch, model, indices):
        if epoch == 1:
            raise KeyboardInterrupt
        return indices

    model = create_model("tiny", 10, (3, 16, 16))

    def train(config, **options):
        cpu = torch.device("cpu")
        train_model(
            model,
            data,
            np.arange(len(data)),
            config,
            cpu,
            None,
            tmp_path / "c.pt",
            progress=True,
            desc="proxy",
            **options,
        )

    with pytest.raises(KeyboardInterrupt):
        train(recipe, after_epoch=dies_in_the_second_epoch)
    train(recipe)
    assert "resuming proxy from epoch 1 of 2" in capsys.readouterr().err
    train(TrainConfig(epochs=3, batch_size=128, augment=False), meta={"other": "run"})
    assert "another run's" in capsys.readouterr().err
