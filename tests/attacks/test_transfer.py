"""The transfer setting: a split that keeps the fine-tuning set out of pretraining, and an evaluation whose rows the
summary reads and a rerun resumes (the victims' fine-tuning is tests/sanitize/test_finetune.py's)."""

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from attacks.smoke import digits_split
from attacks.transfer import transfer_split
from sanitize.cli import cli
from sanitize.errors import SanitizeError


def test_the_fine_tuning_set_is_held_out_of_pretraining_class_by_class():
    train, _ = digits_split()
    pretrain, finetune = transfer_split(train, pool_per_class=40, finetune_per_class=10)
    assert not set(pretrain) & set(finetune)
    assert np.bincount(train.labels[finetune], minlength=10).tolist() == [10] * 10
    assert len(pretrain) == len(train) - 40 * 10
    with pytest.raises(SanitizeError):
        transfer_split(train, pool_per_class=10, finetune_per_class=20)


def test_the_evaluation_writes_a_row_per_key_arm_and_victim_and_a_rerun_resumes(digits_transfer):
    options = {"keys": (0, 1), "poisons": 3, "extractor_epochs": 2, "pool_per_class": 40, "finetune_per_class": 20}
    options |= {"finetune_epochs": 3, "craft_options": {"iterations": 5}}
    rows, out = digits_transfer(**options)
    assert sorted((r["poison_key"], r["arm"]) for r in rows) == sorted(
        (k, a) for k in (0, 1) for a in ("clean", "undefended", "random-noise")
    )
    assert {r["scale"] for r in rows} == {"transfer-linear"} and all(r["train_size"] == 200 for r in rows)
    crafted = [r for r in rows if r["arm"] == "undefended"]
    assert all(r["poisons_sha256"] and r["seconds"]["crafting"] > 0 for r in crafted)
    assert all(r["run"]["precision"] in ("bf16", "fp32") and r["run"]["date"] for r in rows)
    assert "transfer-linear" in (out / "summary.md").read_text()
    again, _ = digits_transfer(**options)
    assert len(again) == len(rows)


def test_the_scan_arms_fine_tune_on_what_the_scan_kept_with_either_proxy_and_deep_knn_on_the_extractor(digits_transfer):
    options = {"keys": (0,), "poisons": 3, "extractor_epochs": 2, "pool_per_class": 40, "finetune_per_class": 20}
    options |= {
        "finetune_epochs": 3,
        "craft_options": {"iterations": 5},
        "arms": ("undefended", "scan", "scan-extractor", "scan-held-out-extractor", "deep_knn-extractor"),
    }
    rows, out = digits_transfer(**options)
    scanned = {r["arm"]: r for r in rows if r["arm"] != "undefended"}
    assert set(scanned) == {"scan", "scan-extractor", "scan-held-out-extractor", "deep_knn-extractor"}
    for row in scanned.values():
        assert row["train_size"] == 200 and row["poisons_sha256"] == rows[0]["poisons_sha256"]
        assert row["auroc"] is not None and row["seconds"]["scan"] > 0
    assert sorted(p.name.rsplit("-", 1)[0] for p in (out / "cache" / "scans").iterdir()) == [
        "extractor",
        "extractor-deep_knn",
        "extractor-held-out",
        "trained",
    ]
    held_out, given = scanned["scan-held-out-extractor"], scanned["scan-extractor"]
    assert held_out["scan_options"]["held_out_checkpoint"] and held_out["dropped_fraction"] >= given["dropped_fraction"]
    assert "Paired with the undefended victims" in (out / "summary.md").read_text()


def test_robust_arms_drop_isolated_examples_in_the_first_quarter_of_fine_tuning_on_the_set_or_what_the_scan_kept(
    digits_transfer,
):
    options = {"keys": (0,), "poisons": 3, "extractor_epochs": 2, "pool_per_class": 40, "finetune_per_class": 20}
    options |= {
        "finetune_epochs": 8,
        "craft_options": {"iterations": 5},
        "arms": ("scan-held-out-extractor", "robust", "scan-held-out-robust"),
    }
    rows, out = digits_transfer(**options)
    by_arm = {r["arm"]: r for r in rows}
    logs = {p.name.split("-")[0]: json.loads(p.read_text()) for p in (out / "cache" / "robust").iterdir()}
    robust_log = next(log for name, log in logs.items() if name == "robust")
    assert robust_log["rounds"] == [1]  # epochs 1 to ceil(8 / 4) - 1: EPIC's first quarter
    assert 0 < len(robust_log["dropped"]) <= robust_log["cap"] == 20  # 10% of 200
    robust = by_arm["robust"]
    assert robust["dropped_fraction"] == len(robust_log["dropped"]) / 200 and robust["auroc"] is None
    assert "scan_dropped_fraction" not in robust
    both, scan = by_arm["scan-held-out-robust"], by_arm["scan-held-out-extractor"]
    assert both["scan_dropped_fraction"] == scan["dropped_fraction"] and both["scan_auroc"] == scan["auroc"]
    assert both["dropped_fraction"] > scan["dropped_fraction"]
    assert (out / "cache" / "scans").is_dir() and len(list((out / "cache" / "scans").iterdir())) == 1  # one scan


def test_the_extractor_and_poisons_are_published_and_a_run_without_the_cache_trains_and_crafts_nothing(
    digits_transfer, monkeypatch
):
    options = {"keys": (0,), "poisons": 3, "extractor_epochs": 2, "pool_per_class": 40, "finetune_per_class": 20}
    options |= {"finetune_epochs": 3, "craft_options": {"iterations": 5}, "arms": ("undefended",)}
    rows, out = digits_transfer(**options)
    assert len(list((out / "extractors").glob("extractor-*.pt"))) == 1
    assert len(list((out / "poisons").glob("poisons-*-transfer-key0-*.npz"))) == 1
    shutil.rmtree(out / "cache")  # a fresh machine: the results and what they published

    def refused(*args, **kwargs):
        raise AssertionError("trained or crafted again although it was published")

    monkeypatch.setattr("attacks.transfer.craft", refused)
    monkeypatch.setattr("attacks.trained.train_model", refused)
    again, _ = digits_transfer(**options | {"victims": 2})
    assert [r["victim_seed"] for r in again] == [0, 1]
    assert again[1]["poisons_sha256"] == rows[0]["poisons_sha256"]


def test_black_box_poisons_are_crafted_against_substitutes_and_kept_apart_from_white_box_ones(digits_transfer):
    options = {"keys": (0,), "poisons": 3, "extractor_epochs": 2, "pool_per_class": 40, "finetune_per_class": 20}
    options |= {"finetune_epochs": 3, "craft_options": {"iterations": 5}, "arms": ("clean", "undefended")}
    white, out = digits_transfer(**options)
    black, _ = digits_transfer(**options | {"substitutes": ("convnet",)})
    added = black[len(white) :]
    assert [r["arm"] for r in added] == ["undefended"]  # the control has no poisons: the white-box run's serves
    assert added[0]["substitutes"] == ["convnet"] and "substitutes" not in white[1]
    assert added[0]["poisons_sha256"] != white[1]["poisons_sha256"]
    cache = out / "cache"
    assert len(list(cache.glob("substitute-*.pt"))) == 1 and len(list(cache.glob("extractor-*.pt"))) == 1
    assert len(list(cache.glob("poisons-*-transfer-black-box-key0-*.npz"))) == 1
    assert "substitutes=convnet" in (out / "summary.md").read_text()


def test_poisons_crafted_with_other_options_are_trained_again_and_kept_apart_in_the_summary(digits_transfer):
    options = {"keys": (0,), "poisons": 3, "extractor_epochs": 2, "pool_per_class": 40, "finetune_per_class": 20}
    options |= {"finetune_epochs": 3, "arms": ("clean", "undefended"), "attack": "bullseye-polytope"}
    first, _ = digits_transfer(**options | {"craft_options": {"iterations": 5}})
    again, out = digits_transfer(**options | {"craft_options": {"iterations": 5, "blocks": True}})
    added = again[len(first) :]
    assert [r["arm"] for r in added] == ["undefended"]  # the control has no poisons: the first run's serves
    assert added[0]["craft_config"]["blocks"] and added[0]["poisons_sha256"] != first[1]["poisons_sha256"]
    assert digits_transfer(**options | {"craft_options": {"iterations": 5, "blocks": True}})[0] == again  # all done
    summary = (out / "summary.md").read_text()
    assert "blocks=True" in summary and "iterations=5" in summary


def test_rows_of_other_poisons_of_the_same_options_do_not_count_as_done(digits_transfer):
    """Poisons crafted again (another extractor, the first poisons gone) are other poisons: their victims train."""
    options = {"keys": (0,), "poisons": 3, "extractor_epochs": 2, "pool_per_class": 40, "finetune_per_class": 20}
    options |= {"finetune_epochs": 3, "arms": ("clean", "undefended"), "craft_options": {"iterations": 5}}
    first, out = digits_transfer(**options)
    rows = (out / "results.jsonl").read_text().replace(first[1]["poisons_sha256"], "0" * 16)
    (out / "results.jsonl").write_text(rows)  # as if the rows had been made on poisons crafted before
    again, _ = digits_transfer(**options)
    assert [(r["arm"], r["poisons_sha256"]) for r in again[len(first) :]] == [
        ("undefended", first[1]["poisons_sha256"])
    ]


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--arms", "scan-robust"], "unknown transfer arm"),
        (["--substitutes", "vgg"], "unknown substitute architecture(s) vgg"),
    ],
)
def test_the_command_refuses_an_unknown_arm_or_substitute_in_one_line(tmp_path, option, message):
    np.savez(tmp_path / "train.npz", x=np.zeros((20, 8, 8, 3), np.uint8), y=np.arange(20) % 2)
    result = CliRunner().invoke(
        cli,
        ["evaluate-transfer", str(tmp_path / "train.npz"), "--test", str(tmp_path / "train.npz")]
        + [*option, "--out", str(tmp_path / "out")],
    )
    assert result.exit_code == 2 and message in result.output


def test_the_command_passes_its_precision_to_the_evaluation(tmp_path, monkeypatch):
    np.savez(tmp_path / "train.npz", x=np.zeros((20, 8, 8, 3), np.uint8), y=np.arange(20) % 2)
    seen = []
    monkeypatch.setattr("attacks.evaluate_transfer.run_transfer_evaluation", lambda *a, **k: seen.append(a[3]))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "summary.md").write_text("")
    args = ["evaluate-transfer", str(tmp_path / "train.npz"), "--test", str(tmp_path / "train.npz")]
    result = CliRunner().invoke(cli, [*args, "--precision", "fp32", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert seen[0].precision == "fp32"
