import csv
import dataclasses
import json
import shlex
import subprocess
import sys
import tempfile
import time

import click
import numpy as np
import pytest
import torch
from click.testing import CliRunner

import sanitize
from sanitize.cli import cli, print_summary
from sanitize.config import ScanConfig, TrainConfig
from sanitize.data import open_dataset
from sanitize.data.arrays import from_arrays
from sanitize.detectors.knn_density import FLAG_REASONS, KnnDensityOptions
from sanitize.errors import SanitizeError
from sanitize.models import create_model
from sanitize.scanner import gate, resolved_model
from sanitize.training import train_model

FAST_ARGS = ["--model", "tiny", "--epochs", "2", "--batch-size", "16", "--no-augment", "--quiet"]
FAST = {"model": "tiny", "epochs": 2, "batch_size": 16, "augment": False, "quiet": True}


def test_scan_writes_the_documented_outputs(tmp_path, digits_folder):
    (digits_folder / "digit_0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["scan", str(digits_folder), "--out", str(out), *FAST_ARGS])
    assert result.exit_code == 0, result.output
    assert "gate      PASSED" in result.output
    with (out / "scores.csv").open() as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["id", "path", "label", "class", "score", "flagged", "reason"]
    assert all(r[3] == f"digit_{r[2]}" for r in rows[1:])
    assert len(rows) == 401
    ids = [r[0] for r in rows[1:]]
    assert "digit_0/broken.png" not in ids and ids[0].startswith("digit_0/")
    assert all(r[1].endswith(r[0]) and r[5] in ("0", "1") and 0 <= float(r[4]) < 1 for r in rows[1:])
    flagged = (out / "flagged.txt").read_text().split()
    assert flagged == [r[0] for r in rows[1:] if r[5] == "1"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kind"] == "scan" and summary["versions"]["sanitize"] == sanitize.__version__
    assert summary["date"].endswith("+00:00") and "command" in summary
    assert summary["date"] in (out / "report.html").read_text(encoding="utf-8")
    assert summary["versions"]["torch"] == torch.__version__
    assert summary["data"]["fingerprint"].startswith("sha256:")
    assert summary["data"]["skipped"][0]["id"] == "digit_0/broken.png"
    assert summary["data"]["counts_per_class"]["digit_0"] == sum(r[0].startswith("digit_0/") for r in rows[1:])
    assert summary["flagged"]["count"] == len(flagged)
    assert summary["gate"] == {
        "verdict": "passed",
        "caution": None,
        "max_flagged_fraction": 0.05,
        "flagged_fraction": len(flagged) / 400,
        "alarmed_classes": [],
        "fail_on_class_alarm": True,
        "passed": True,
    }
    assert summary["config"]["train"]["epochs"] == 2
    assert {"validate", "train_proxy", "embed", "density", "total", "proxy_all_epochs"} <= set(summary["seconds"])
    for name in ("features", "logits", "gradient"):
        assert np.load(out / "embeddings" / f"{name}.npy", mmap_mode="r").shape[0] == 400


def test_a_file_that_fails_to_decode_late_is_skipped_as_a_full_validation_skips_it(tmp_path, digits_folder):
    good = next((digits_folder / "digit_4").glob("*.png")).read_bytes()
    (digits_folder / "digit_4" / "truncated.png").write_bytes(good[: len(good) // 2])  # a valid header
    runs = {}
    for validation in ("header", "full"):
        out = tmp_path / validation
        result = CliRunner().invoke(
            cli, ["scan", str(digits_folder), "--out", str(out), "--validation", validation, *FAST_ARGS]
        )
        assert result.exit_code == 0, result.output
        with (out / "scores.csv").open() as handle:
            runs[validation] = (json.loads((out / "summary.json").read_text()), list(csv.reader(handle)))
    (header, header_rows), (full, full_rows) = runs["header"], runs["full"]
    assert [r[0] for r in header_rows] == [r[0] for r in full_rows] and len(header_rows) == 401
    assert header["data"]["fingerprint"] == full["data"]["fingerprint"] and header["data"]["examples"] == 400
    (skip,) = header["data"]["skipped"]
    assert skip["id"] == "digit_4/truncated.png" and "found when first decoded" in skip["reason"]
    assert [s["id"] for s in full["data"]["skipped"]] == [skip["id"]]
    # the proxy saw it black while it trained; the detector, the outputs and the report see the other 400 rows
    assert header["embeddings"]["directory"] == "embeddings/decoded" and full["embeddings"]["directory"] == "embeddings"
    decoded = tmp_path / "header" / "embeddings" / "decoded"
    assert np.load(decoded / "features.npy", mmap_mode="r").shape[0] == 400
    assert np.load(tmp_path / "header" / "embeddings" / "features.npy", mmap_mode="r").shape[0] == 401
    assert "found when first decoded" in (tmp_path / "header" / "report.html").read_text(encoding="utf-8")
    # a rerun in the same folder reuses the proxy, the pass and the record: the same rows and scores
    result = CliRunner().invoke(cli, ["scan", str(digits_folder), "--out", str(tmp_path / "header"), *FAST_ARGS])
    assert result.exit_code == 0, result.output
    with (tmp_path / "header" / "scores.csv").open() as handle:
        assert list(csv.reader(handle)) == header_rows


def test_model_auto_is_resolved_to_the_architecture_it_means_for_the_data():
    def data(side):
        return from_arrays(np.zeros((4, side, side, 3), np.uint8), np.arange(4) % 2, ["a", "b"], source="test")

    assert resolved_model(ScanConfig(), data(32)).model == "convnet"
    assert resolved_model(ScanConfig(), data(96)).model == "resnet18"
    assert resolved_model(ScanConfig(model="tiny"), data(96)).model == "tiny"


def test_gate_failure_exits_1_and_api_agrees(tmp_path, digits_npz):
    result = CliRunner().invoke(
        cli, ["scan", str(digits_npz), "--out", str(tmp_path / "o"), "--max-flagged-fraction", "0", *FAST_ARGS]
    )
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["flagged"]["count"] > 0  # a proxy trained 2 epochs always has some isolated examples
    assert result.exit_code == 1 and "gate      FAILED" in result.output
    flagged = shlex.quote(str(tmp_path / "o" / "flagged.txt"))
    assert f"next      sanitize train {shlex.quote(str(digits_npz))} --robust --exclude {flagged}" in result.output
    api = sanitize.scan(digits_npz, tmp_path / "o", max_flagged_fraction=0.0, **FAST)
    assert not api.passed and api.flagged_ids == (tmp_path / "o" / "flagged.txt").read_text().split()


def test_the_class_alarm_fails_the_gate_unless_turned_off_and_is_printed(tmp_path, digits_npz, capsys):
    quiet, strict = ScanConfig(fail_on_class_alarm=False), ScanConfig()
    assert gate(0.03, ["horse"], quiet)["passed"] and not gate(0.03, ["horse"], strict)["passed"]
    assert gate(0.03, [], strict)["passed"] and not gate(0.06, [], quiet)["passed"]
    assert gate(0.03, ["horse"], strict)["alarmed_classes"] == ["horse"]
    result = sanitize.scan(digits_npz, tmp_path / "o", **FAST)
    assert result.summary["gate"]["fail_on_class_alarm"] and result.summary["config"]["fail_on_class_alarm"]
    off = CliRunner().invoke(
        cli, ["scan", str(digits_npz), "--out", str(tmp_path / "o"), "--no-fail-on-class-alarm", *FAST_ARGS]
    )
    assert (
        off.exit_code in (0, 1)
        and not json.loads((tmp_path / "o" / "summary.json").read_text())["gate"]["fail_on_class_alarm"]
    )
    result.summary["gate"] |= {"alarmed_classes": ["digit_3"], "passed": False, "verdict": "failed"}
    print_summary(result)
    printed = capsys.readouterr().out
    assert (
        "gate      FAILED" in printed
        and "alarm     a flagged group of its own in digit_3" in printed
        and "the gate fails on it" in printed
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["scan", "{missing}"], "does not exist"),
        (["scan", "{data}", "--out", "{data}/inside"], "inside DATA"),
        (["scan", "{bad_npz}"], "not an .npz archive"),
        (["scan", "{data}", "--model", "nope"], "unknown model"),
        (["scan", "{data}", "--threshold", "2"], "threshold"),
        (["scan", "{data}", "--checkpoint", "{bad_npz}"], "cannot load checkpoint"),
        (["scan", "{data}", "--decoded-cache", "sometimes"], "decoded-cache"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, digits_folder, args, message):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"garbage")
    values = {"missing": tmp_path / "nope", "data": digits_folder, "bad_npz": bad}
    args = [a.format(**values) for a in args]
    out = [] if "--out" in args else ["--out", str(tmp_path / "out")]
    result = CliRunner().invoke(cli, [*args[:2], *FAST_ARGS, *out, *args[2:]])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (digits_folder / "inside").exists()


def test_wrong_checkpoint_shape_is_a_clear_error(tmp_path, digits_npz):
    weights = tmp_path / "w.pt"
    torch.save(create_model("tiny", 3, (3, 16, 16)).state_dict(), weights)
    with pytest.raises(SanitizeError, match="does not fit the model"):
        sanitize.scan(digits_npz, tmp_path / "o", checkpoint=str(weights), **FAST)


def test_same_seed_same_scores_and_checkpoint_reuse(tmp_path, digits_npz):
    first = sanitize.scan(digits_npz, tmp_path / "a", seed=3, **FAST)
    second = sanitize.scan(digits_npz, tmp_path / "b", seed=3, **FAST)
    np.testing.assert_array_equal(first.scores, second.scores)
    other = sanitize.scan(digits_npz, tmp_path / "c", seed=4, **FAST)
    assert not np.array_equal(first.scores, other.scores)
    reused = sanitize.scan(
        digits_npz, tmp_path / "d", checkpoint=str(tmp_path / "a" / "proxy" / "model.pt"), seed=3, **FAST
    )
    np.testing.assert_allclose(reused.scores, first.scores, atol=1e-6)
    assert reused.summary["model"]["checkpoint"].endswith("model.pt")


def test_killed_training_resumes_to_the_same_weights(tmp_path, digits_npz):
    dataset = open_dataset(digits_npz)
    config = TrainConfig(epochs=3, batch_size=128, augment=True)

    def run(checkpoint, kill_after=None):
        torch.manual_seed(0)
        model = create_model("tiny", 10, (3, 16, 16))

        def hook(epoch, _model, indices):
            if epoch == kill_after:
                raise KeyboardInterrupt
            return indices

        train_model(
            model,
            dataset,
            np.arange(len(dataset)),
            config,
            torch.device("cpu"),
            None,
            checkpoint=checkpoint,
            progress=False,
            after_epoch=hook,
        )
        return model.state_dict()

    straight = run(tmp_path / "straight.pt")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "killed.pt", kill_after=1)
    resumed = run(tmp_path / "killed.pt")
    for name, tensor in straight.items():
        torch.testing.assert_close(resumed[name], tensor)
    history = torch.load(tmp_path / "killed.pt", weights_only=True)["history"]  # every epoch's time, across the kill
    assert [h["epoch"] for h in history] == [1, 2, 3] and all(
        h["seconds"] > 0 and h["cpu_seconds"] > 0 for h in history
    )


def test_demo_runs_finds_planted_examples_and_leaves_no_data_behind(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    result = CliRunner().invoke(cli, ["demo", "--out", str(tmp_path / "demo"), "--quiet"])
    assert result.exit_code == 0, result.output
    mislabeled, stamped = (line.split() for line in result.output.splitlines() if line.startswith("planted "))
    assert int(mislabeled[3]) == 36 and int(mislabeled[1]) >= 5
    assert int(stamped[3]) == 25 and int(stamped[1]) >= 13  # the stand-in group of one class: most of it caught
    assert "alarm     a flagged group of its own in digit_3" in result.output and "gate      FAILED" in result.output
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["poisons"]["caught"] == int(stamped[1])  # the report's poison view has the planted group
    assert list((tmp_path / "tmp").iterdir()) == [] and (tmp_path / "demo" / "report.html").exists()
    # scores.csv says why each flagged row is flagged, as the detector recorded it, and nothing for the others
    with (tmp_path / "demo" / "scores.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    why = np.load(tmp_path / "demo" / "embeddings" / "flag_reason.npy")
    assert [r["reason"] for r in rows] == [
        FLAG_REASONS[int(w)] if r["flagged"] == "1" else "" for r, w in zip(rows, why)
    ]
    assert len({r["reason"] for r in rows if r["flagged"] == "1"}) >= 2  # the planted kinds, flagged by other rules


def test_rerun_in_the_same_out_dir_reuses_proxy_and_embeddings(tmp_path, digits_npz):
    first = sanitize.scan(digits_npz, tmp_path / "o", **FAST)
    embedded = (tmp_path / "o" / "embeddings" / "features.npy").stat().st_mtime_ns
    again = sanitize.scan(digits_npz, tmp_path / "o", threshold=0.2, **FAST)
    assert (tmp_path / "o" / "embeddings" / "features.npy").stat().st_mtime_ns == embedded
    assert again.summary["model"]["history"] == first.summary["model"]["history"]
    np.testing.assert_array_equal(again.scores, first.scores)
    assert again.flags.sum() > first.flags.sum() and not (first.flags & ~again.flags).any()


def test_the_cli_loads_no_heavy_library_until_a_command_runs():
    """--help, --version and usage errors must be instant: importing the CLI loads neither torch nor faiss,
    scikit-learn or scipy (benchmarks/cli_latency.py measures the time)."""
    code = (
        "import sys, sanitize.cli; print(sorted(m for m in ('torch', 'faiss', 'sklearn', 'scipy') if m in sys.modules))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"
    result = CliRunner().invoke(cli, ["scan", "--help"])
    assert result.exit_code == 0 and "--k-small" in result.output


def test_help_is_short_flagged_and_names_the_exit_codes():
    result = CliRunner().invoke(cli, ["-h"])
    assert result.exit_code == 0 and "Exit codes: 0 passed, 1 the gate failed, 2 bad input" in result.output
    for name, command in cli.commands.items():
        missing = [p.name for p in command.params if isinstance(p, click.Option) and not p.help]
        assert missing == [], f"{name} options without help text: {missing}"


def test_data_the_scan_cannot_judge_gets_no_verdict(tmp_path, digits_npz):
    x, y = np.load(digits_npz)["x"], np.load(digits_npz)["y"]
    np.savez(tmp_path / "one.npz", x=x[y == 3], y=np.zeros((y == 3).sum(), int))
    result = CliRunner().invoke(cli, ["scan", str(tmp_path / "one.npz"), "--out", str(tmp_path / "o1"), *FAST_ARGS])
    assert result.exit_code == 4 and "INCONCLUSIVE" in result.output and "one class" in result.output
    summary = json.loads((tmp_path / "o1" / "summary.json").read_text())
    assert summary["gate"]["verdict"] == "inconclusive" and not summary["gate"]["passed"]
    assert "No verdict: the data has one class" in (tmp_path / "o1" / "report.html").read_text(encoding="utf-8")
    weak = sanitize.scan(digits_npz, tmp_path / "o2", **(FAST | {"epochs": 0}))  # an untrained proxy: chance
    assert weak.summary["gate"]["verdict"] == "inconclusive" and "too weak" in weak.summary["gate"]["caution"]


def test_a_scan_killed_mid_training_leaves_no_verdict_and_a_rerun_finishes_with_the_same_scores(tmp_path, digits_npz):
    """SIGKILL, not an exception: the process gets no chance to clean up."""
    command = [sys.executable, "-m", "sanitize", "scan", str(digits_npz), "--model", "tiny", "--epochs", "8"]
    straight = tmp_path / "straight"
    assert subprocess.run([*command, "--out", str(straight), "--quiet"], capture_output=True).returncode in (0, 1)
    killed = tmp_path / "killed"
    process = subprocess.Popen([*command, "--out", str(killed), "--quiet"], stderr=subprocess.DEVNULL)
    checkpoint = killed / "proxy" / "checkpoint.pt"
    while not checkpoint.exists() and process.poll() is None:  # the first epoch is saved: kill mid-training
        time.sleep(0.02)
    process.kill()
    assert process.wait() == -9, "the scan finished before it could be killed"
    assert not (killed / "summary.json").exists()  # no verdict left behind by the killed run
    resumed = subprocess.run([*command, "--out", str(killed)], capture_output=True, text=True)
    assert resumed.returncode in (0, 1) and "resuming proxy from epoch" in resumed.stderr
    with (straight / "scores.csv").open() as a, (killed / "scores.csv").open() as b:
        assert a.read() == b.read()


def test_every_option_of_the_default_rule_is_a_scan_flag_with_the_same_default():
    flags = {p.name: p.default for p in cli.commands["scan"].params}
    assert {name: flags.get(name) for name in dataclasses.asdict(KnnDensityOptions())} == dataclasses.asdict(
        KnnDensityOptions()
    )
