"""Under torchrun: how work is split, and scan / robust training with two CPU processes (Gloo) against one process."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from sanitize.cli import cli
from sanitize.distributed import World
from sanitize.scanner import scan

TINY = dict(model="tiny", epochs=2, batch_size=16, augment=False, precision="fp32", quiet=True)  # a proxy that judges


def torchrun(*args: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "sanitize",
        *args,
    ]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=600, env=os.environ | {"OMP_NUM_THREADS": "1"}
    )


@pytest.mark.parametrize("n, world_size", [(10, 3), (1000, 2), (2, 4)])
def test_shares_cover_every_row_once(n, world_size):
    worlds = [World(rank, world_size) for rank in range(world_size)]
    ranges = [w.row_range(n) for w in worlds]
    assert ranges[0][0] == 0 and ranges[-1][1] == n and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    order = np.random.default_rng(0).permutation(n)
    shares = [w.epoch_share(order) for w in worlds]
    assert len({len(s) for s in shares}) == 1  # as many steps on every rank
    taken = np.concatenate(shares)
    assert len(taken) == len(set(taken)) == n - n % world_size


def test_one_process_is_a_world_of_one():
    order = np.arange(7)
    assert World().row_range(7) == (0, 7) and World().epoch_share(order) is order and World().is_main


def test_a_two_process_scan_matches_one_process(tmp_path, digits_folder):
    (digits_folder / "digit_3" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    single = scan(digits_folder, tmp_path / "one", **TINY)
    done = torchrun(
        "scan",
        str(digits_folder),
        "--out",
        str(tmp_path / "two"),
        "--checkpoint",
        str(tmp_path / "one" / "proxy" / "model.pt"),
        "--model",
        "tiny",
        "--precision",
        "fp32",
        "--quiet",
    )
    assert done.returncode == (0 if single.passed else 1), done.stderr[-3000:]
    assert done.stdout.count("gate ") == 1  # rank 0 alone prints the verdict
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["device"]["processes"] == 2
    assert summary["data"]["fingerprint"] == single.summary["data"]["fingerprint"]
    assert [s["id"] for s in summary["data"]["skipped"]] == ["digit_3/broken.png"]  # validated in shares, gathered
    for name in ("features", "logits", "gradient"):
        two = np.load(tmp_path / "two" / "embeddings" / f"{name}.npy")
        one = np.load(tmp_path / "one" / "embeddings" / f"{name}.npy")
        np.testing.assert_allclose(two, one, rtol=1e-4, atol=1e-5)  # each rank wrote its rows, none lost or shifted
    assert (tmp_path / "two" / "flagged.txt").read_text() == (tmp_path / "one" / "flagged.txt").read_text()
    assert sorted(p.name for p in (tmp_path / "two" / "embeddings").glob("progress*.json")) == [
        "progress-0-of-2.json",
        "progress-1-of-2.json",
    ]


@pytest.mark.parametrize("pool_runs", [1, 2])
def test_robust_training_under_torchrun_drops_the_planted_examples_once(tmp_path, mislabeled_npz, pool_runs):
    data, planted = mislabeled_npz
    done = torchrun(
        "train",
        str(data),
        "--out",
        str(tmp_path / "run"),
        "--robust",
        "--every",
        "2",
        "--model",
        "tiny",
        "--epochs",
        "6",
        "--batch-size",
        "32",
        "--no-augment",
        "--pool-runs",
        str(pool_runs),
        "--quiet",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("dropped ") == 1
    # a pooled first round's scout trains under torchrun too; its round is kept and its folder removed
    assert len(list((tmp_path / "run").glob("drop_log.scout*.npz"))) == pool_runs - 1
    assert not list((tmp_path / "run").glob("scout-seed*"))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["device"]["processes"] == 2
    assert summary["model"]["history"][0]["examples"] == 1000  # both ranks' halves counted
    assert summary["train_accuracy"] > 0.8  # the ranks' gradients were averaged into one model that learned
    log = json.loads((tmp_path / "run" / "drop_log.json").read_text())
    positions = [row["position"] for row in log["dropped"]]
    assert len(positions) == len(set(positions)) == summary["robust"]["dropped"] <= log["cap"]
    assert np.isin(planted, positions).mean() >= 0.5
    torch.load(tmp_path / "run" / "model.pt", weights_only=True)


@pytest.mark.parametrize("command", [["evaluate", "x.npz", "--test", "y.npz", "--out", "o"], ["demo"], ["report", "."]])
def test_commands_not_split_across_ranks_refuse_torchrun(command, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = CliRunner().invoke(cli, command)
    assert result.exit_code == 2 and "runs in one process" in result.output
