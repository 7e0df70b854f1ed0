"""`sanitize train`: plain and robust (EPIC) training, the drop log, the cap, and resume after a kill."""

import json
import os
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from sanitize.cli import cli
from sanitize.config import RobustConfig, TrainConfig
from sanitize.data import open_dataset
from sanitize.embeddings import compute_embeddings
from sanitize.models import create_model
from sanitize.robust import EpicDropper, robust_work_counts, scored_rounds, scout_seed
from sanitize.trainer import train
from sanitize.training import train_model
from sanitize.work import trained_examples

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
    # the precision --precision auto resolved to, under which the rounds scored
    assert result.summary["device"]["precision"] in ("fp32", "bf16") and result.summary["device"]["device"] == "cpu"
    labels = np.load(data)["y"]
    assert all(labels[row["position"]] == row["class"] for row in log["dropped"])
    html = result.files["report"].read_text(encoding="utf-8")
    assert f"<strong>{len(positions)}</strong> examples" in html and html.count("<figure") == min(len(positions), 48)


def test_the_cap_bounds_what_is_dropped(tmp_path, mislabeled_npz):
    data, _ = mislabeled_npz
    result = train(data, tmp_path / "r", robust=True, every=2, max_dropped_fraction=0.005, **FAST)
    assert len(result.dropped_ids) == 5


def test_a_spread_cap_keeps_room_for_every_round(tmp_path, mislabeled_npz):
    data, _ = mislabeled_npz
    options = FAST | {"robust": True, "every": 1, "max_dropped_fraction": 0.02}
    whole = json.loads(train(data, tmp_path / "whole", **options).files["drop_log"].read_text())
    spread = json.loads(train(data, tmp_path / "spread", spread_cap=True, **options).files["drop_log"].read_text())
    assert whole["rounds"] == spread["rounds"] == [1, 2, 3, 4, 5] and whole["cap"] == spread["cap"] == 20
    first = [row for row in whole["dropped"] if row["round"] == 1]
    assert len(first) == 20  # without it the first round spends the whole cap on this set
    for position, round_epoch in enumerate(spread["rounds"], start=1):
        assert sum(row["round"] <= round_epoch for row in spread["dropped"]) <= 20 * position // 5
    assert len({row["round"] for row in spread["dropped"]}) > 1


@pytest.mark.parametrize("cap", [0.1, 0.005])
def test_a_robust_runs_work_counted_from_its_drop_log_is_what_it_trained_and_scored(
    tmp_path, mislabeled_npz, cap, monkeypatch
):
    data, _ = mislabeled_npz
    passes = []
    original = EpicDropper._gradient_proxy
    monkeypatch.setattr(EpicDropper, "_gradient_proxy", lambda self, *a: passes.append(1) or original(self, *a))
    options = FAST | {"batch_size": 37}  # 1,000 = 27 x 37 + 1: the first epochs leave a batch of one out
    result = train(data, tmp_path / "r", robust=True, every=1, max_dropped_fraction=cap, **options)
    log = json.loads(result.files["drop_log"].read_text())
    trained = sum(epoch["examples"] for epoch in result.summary["model"]["history"])
    assert robust_work_counts(log, 1000, 6, 37) == (trained, len(passes) * 1000)
    assert (
        len(scored_rounds(log)) == len(passes) < len(log["rounds"]) if cap < 0.01 else len(passes) == len(log["rounds"])
    )
    work = result.summary["work"]
    assert (work["trained_examples"], work["scored_examples"]) == (trained, len(passes) * 1000) and work["flops"] > 0
    assert f"{trained} examples trained on, {len(passes) * 1000} scored" in result.files["report"].read_text()


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


def recording_isolation(monkeypatch) -> list[tuple[str, np.ndarray]]:
    """Every round's isolated set (before votes and cap), named by the run that scored it: the run's log or a scout."""
    seen, original = [], EpicDropper._isolated

    def recorded(self, model, stem):
        isolated, norms = original(self, model, stem)
        seen.append((stem, isolated))
        return isolated, norms

    monkeypatch.setattr(EpicDropper, "_isolated", recorded)
    return seen


@pytest.mark.parametrize(("votes", "cap"), [(2, 1.0), (1, 0.02), (3, 1.0)])
def test_a_pooled_first_round_drops_what_enough_runs_isolate(tmp_path, mislabeled_npz, monkeypatch, votes, cap):
    data, _ = mislabeled_npz
    seen = recording_isolation(monkeypatch)
    options = FAST | {"robust": True, "every": 2, "max_dropped_fraction": cap, "pool_runs": 3, "pool_votes": votes}
    result = train(data, tmp_path / "r", **options)
    log = json.loads(result.files["drop_log"].read_text())
    # the run's first round, then its scouts', then its later rounds (not pooled)
    assert [stem for stem, _ in seen][:3] == ["drop_log", "drop_log.scout1", "drop_log.scout2"]
    assert [stem for stem, _ in seen][3:] == ["drop_log"] * (len(seen) - 3)
    count = np.zeros(1000, dtype=int)
    for _, isolated in seen[:3]:
        count[isolated] += 1
    first = np.array(sorted(row["position"] for row in log["dropped"] if row["round"] == 2))
    if cap == 1.0:
        assert np.array_equal(first, np.flatnonzero(count >= votes))
    else:  # beyond the cap the most votes go first
        passed_over = np.setdiff1d(np.flatnonzero(count >= 1), first)
        assert len(first) == 20 and count[first].min() >= count[passed_over].max()
    for j in (1, 2):
        with np.load(tmp_path / "r" / f"drop_log.scout{j}.npz", allow_pickle=False) as scout:
            assert np.array_equal(scout["isolated"], seen[j][1]) and scout["norms"].shape == (1000,)
    scouts = [{"seed": scout_seed(0, j), "isolated": len(seen[j][1])} for j in (1, 2)]
    assert result.summary["robust"]["scouts"] == scouts
    assert not list((tmp_path / "r").glob("scout-seed*")) and not list((tmp_path / "r").glob("*.proxy.npy"))
    trained = sum(epoch["examples"] for epoch in result.summary["model"]["history"])
    scouts_trained = 2 * trained_examples(1000, 2, 32)
    work = result.summary["work"]
    expected = (trained + scouts_trained, (len(scored_rounds(log)) + 2) * 1000)
    assert (work["trained_examples"], work["scored_examples"]) == expected == robust_work_counts(log, 1000, 6, 32)


def test_a_run_killed_inside_a_scout_resumes_without_training_the_finished_scouts_again(
    tmp_path, mislabeled_npz, monkeypatch
):
    data, _ = mislabeled_npz
    options = FAST | {"robust": True, "every": 2, "pool_runs": 3}
    reference = train(data, tmp_path / "whole", **options)
    original = EpicDropper._isolated

    def killed_in_second_scout(self, model, stem):
        if stem.endswith("scout2"):
            raise KeyboardInterrupt
        return original(self, model, stem)

    monkeypatch.setattr(EpicDropper, "_isolated", killed_in_second_scout)
    with pytest.raises(KeyboardInterrupt):
        train(data, tmp_path / "killed", **options)
    assert (tmp_path / "killed" / "drop_log.scout1.npz").exists()
    assert (tmp_path / "killed" / f"scout-seed{scout_seed(0, 2)}" / "checkpoint.pt").exists()
    monkeypatch.setattr(EpicDropper, "_isolated", original)
    seen = recording_isolation(monkeypatch)
    resumed = train(data, tmp_path / "killed", **options)
    assert "drop_log.scout1" not in [stem for stem, _ in seen]  # its stored round is read, not trained again
    assert (
        json.loads(resumed.files["drop_log"].read_text())["dropped"]
        == json.loads(reference.files["drop_log"].read_text())["dropped"]
    )


def test_robust_runs_cached_before_pooling_keep_their_names():
    assert RobustConfig().identity() == {
        "fraction": 0.2,
        "every": None,
        "warmup": 1,
        "max_dropped_fraction": 0.1,
        "spread_cap": False,
    }
    assert RobustConfig(pool_runs=4).identity()["pool_runs"] == 4


@pytest.mark.parametrize(
    ("options", "message"),
    [(["--pool-runs", "0"], "pool_runs must be >= 1"), (["--pool-runs", "2", "--pool-votes", "3"], "pool_votes")],
)
def test_a_bad_pooling_option_is_a_one_line_error(tmp_path, digits_npz, options, message):
    result = CliRunner().invoke(cli, ["train", str(digits_npz), "--out", str(tmp_path / "t"), "--robust", *options])
    assert result.exit_code == 2 and message in result.output, result.output


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
    loud = CliRunner().invoke(cli, ["train", str(digits_npz), "--out", str(tmp_path / "v"), "--noise-eps", "300"])
    assert loud.exit_code == 2 and "noise_eps must be in [0, 255]" in loud.output


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


def test_training_with_a_scans_flags_excluded_equals_training_on_the_rest(tmp_path, digits_npz):
    """scan, then `train --exclude flagged.txt`: the same weights as training on an npz of the other examples."""
    arrays = np.load(digits_npz)
    listed = tmp_path / "flagged.txt"
    listed.write_text("".join(f"{i}\n" for i in range(0, 300, 10)) + "\n")  # 30 ids and a blank line
    rest = np.setdiff1d(np.arange(len(arrays["y"])), np.arange(0, 300, 10))
    np.savez(tmp_path / "rest.npz", x=arrays["x"][rest], y=arrays["y"][rest])
    fast = dict(model="tiny", epochs=1, batch_size=64, quiet=True)
    excluded = train(digits_npz, tmp_path / "e", exclude=str(listed), robust=True, **fast)
    reference = train(tmp_path / "rest.npz", tmp_path / "r", robust=True, **fast)
    for name, weights in excluded.model.state_dict().items():
        torch.testing.assert_close(weights, reference.model.state_dict()[name], rtol=0, atol=0)
    summary = excluded.summary
    assert summary["data"]["fingerprint"] == open_dataset(digits_npz).fingerprint  # DATA's, as its scan records it
    assert summary["data"]["examples"] == len(arrays["y"])
    assert summary["excluded"]["examples"] == 30
    assert summary["excluded"]["trained_fingerprint"] == reference.summary["data"]["fingerprint"]
    kept = set(excluded.files["kept"].read_text().split())
    assert len(kept) + len(excluded.dropped_ids) == len(rest) and not kept & {str(i) for i in range(0, 300, 10)}


def test_a_folders_listed_files_are_left_out_of_robust_training(tmp_path, digits_folder):
    ids = open_dataset(digits_folder).ids
    listed = tmp_path / "flagged.txt"
    listed.write_text(f"{ids[3]}\n{ids[300]}\n")
    result = train(digits_folder, tmp_path / "t", exclude=str(listed), robust=True, model="tiny", epochs=1, quiet=True)
    kept = set(result.files["kept"].read_text().splitlines())
    assert result.summary["excluded"]["examples"] == 2 and not kept & {ids[3], ids[300]}
    assert "2 listed in" in (tmp_path / "t" / "report.html").read_text(encoding="utf-8")
    assert len(kept) + len(result.dropped_ids) == len(ids) - 2


@pytest.mark.parametrize(
    "content, message",
    [
        (b"0\nno-such-id\n", "names 1 id(s) that"),
        (b"\xff\xfe\x00", "cannot read the exclusion list"),
    ],
)
def test_an_exclusion_list_for_other_data_is_a_one_line_error(tmp_path, digits_npz, content, message):
    listed = tmp_path / "flagged.txt"
    listed.write_bytes(content)
    args = ["train", str(digits_npz), "--out", str(tmp_path / "t"), "--exclude", str(listed), "--quiet"]
    result = CliRunner().invoke(cli, [*args, "--model", "tiny", "--epochs", "1"])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "t").exists()  # nothing written: the folder the failed run made is removed


def test_an_exclusion_list_naming_every_example_leaves_nothing_to_train(tmp_path, digits_npz):
    listed = tmp_path / "flagged.txt"
    listed.write_text("".join(f"{i}\n" for i in range(len(np.load(digits_npz)["y"]))))
    result = CliRunner().invoke(cli, ["train", str(digits_npz), "--out", str(tmp_path / "t"), "--exclude", str(listed)])
    assert result.exit_code == 2 and "nothing left to train on" in result.output
