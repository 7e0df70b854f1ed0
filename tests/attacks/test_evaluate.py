import dataclasses
import json
import shutil
import threading

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from attacks import attack_options, choose_setup, craft, load_poisons
from attacks.arms import SCAN_PART
from attacks.evaluate import run_evaluation
from attacks.experiment import EVADE_PROXY_SEED, Harness, load_scan_outcome, same_scan_outcome, save_scan_outcome
from attacks.rows import REQUIRED as ROW_REQUIRED
from attacks.rows import SCAN_OPTIONS_RECORDED, default_scan_options, defense_key
from attacks.scales import SCALES, EvaluationConfig
from attacks.selection import gradient_norms, select_poisons
from attacks.summary import _cost_vs_plain, aggregate
from attacks.trained import Cost, ModelCache
from sanitize.cli import cli, parse_keys
from sanitize.config import ScanConfig
from sanitize.data.arrays import from_arrays
from sanitize.detectors.epic import EpicOptions
from sanitize.detectors.knn_density import KnnDensityOptions
from sanitize.errors import SanitizeError
from sanitize.friendly import STEPS
from sanitize.models import resolve_model_name
from sanitize.scanner import ScanResult
from sanitize.training import precision_name, resolve_precision, train_model
from sanitize.work import example_flops, trained_examples

CPU_DEVICE = torch.device("cpu")

REQUIRED = {
    "attack",
    "scale",
    "eps",
    "budget",
    "poison_key",
    "target_id",
    "target_class",
    "intended_class",
    "arm",
    "victim_seed",
    "success",
    "target_pred",
    "clean_acc",
    "dropped_fraction",
    "poison_precision",
    "poison_recall",
    "auroc",
    "model",
    "train_size",
    "epochs",
    "seconds",
}


def quick_smoke(tmp_path) -> dict:
    """The smallest evaluation: one key, one epoch, two crafting iterations, a cache shared by the test's runs."""
    return dict(scale="smoke", keys=(0,), eps=16, budget=0.02, epochs=1, iterations=2, cache=str(tmp_path / "cache"))


def evaluate_cli(train, test, *args: str):
    """`sanitize evaluate TRAIN --test TEST ARGS...` through click, as a user runs it."""
    return CliRunner().invoke(cli, ["evaluate", str(train), "--test", str(test), *args])


def test_smoke_evaluation_writes_protocol_rows_and_resumes(tmp_path, split_npz):
    train, test = split_npz
    config = EvaluationConfig(scale="smoke", keys=(0, 1), victims=1, eps=16, budget=0.02, epochs=2, iterations=3)
    out = run_evaluation(train, test, tmp_path / "eval", config, progress=False, command="test")
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(REQUIRED <= set(r) for r in rows)
    assert {r["arm"] for r in rows} == {"clean", "undefended", "random-noise"}
    assert all(r["train_size"] == 600 and r["scale"] == "smoke" and 0 <= r["clean_acc"] <= 1 for r in rows)
    assert all(r["success"] == (r["target_pred"] == r["intended_class"]) and 0 <= r["p_intended"] <= 1 for r in rows)
    assert {"surrogate", "crafting", "victim_training"} <= set(rows[0]["seconds"])
    assert all(
        0 < r["seconds"]["victim_training_cpu"] for r in rows
    )  # process CPU time: the cost basis on a shared CPU
    machine_precision = precision_name(resolve_precision("auto", torch.device("cpu")))
    # where each victim ran: precision `auto` resolves per machine, so pairs across machines can be told apart
    assert all(r["run"]["device"] == "cpu" and r["run"]["precision"] == machine_precision for r in rows)
    clean = [r for r in rows if r["arm"] == "clean"]
    assert clean[0]["target_id"] != clean[1]["target_id"] or clean[0]["poison_key"] != clean[1]["poison_key"]
    # a rerun finds every row done: nothing is trained or appended again
    run_evaluation(train, test, tmp_path / "eval", config, progress=False)
    assert len((out / "results.jsonl").read_text().splitlines()) == 6
    summary = json.loads((out / "summary.json").read_text())
    table = summary["table"]
    assert summary["kind"] == "evaluation"
    assert {t["arm"] for t in table} == {"clean", "undefended", "random-noise"} and all(
        t["victims"] == 2 for t in table
    )
    assert "| gradient-matching | smoke | tiny | 2 | 16 |" in (out / "summary.md").read_text()
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "Success per arm" in html and all(f"<td>{arm}" in html for arm in ("clean", "undefended", "random-noise"))
    # --iterations 3 crafts otherwise than the smoke scale's 20: the poisoned arm is that variant of the attack
    assert {(t["arm"], t["variant"]) for t in table} >= {("undefended", "iterations=3"), ("clean", "")}


def test_defended_arms_score_their_flags_against_the_true_poisons(tmp_path, split_npz):
    train, test = split_npz
    arms = (
        "undefended",
        "scan",
        "robust",
        "scan-robust",
        "epic",
        "deep_knn",
        "spectral_signatures",
        "activation_clustering",
    )
    config = EvaluationConfig(
        scale="smoke", keys=(0,), victims=1, eps=16, budget=0.02, epochs=2, iterations=3, arms=arms
    )
    out = run_evaluation(train, test, tmp_path / "eval", config, progress=False, command="test")
    rows = {r["arm"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert set(rows) == set(arms)
    for arm in arms[1:]:
        row = rows[arm]
        assert 0 <= row["dropped_fraction"] <= 1 and 0 <= row["poison_recall"] <= 1, arm
        assert (row["auroc"] is None) == (arm in ("robust", "scan-robust")), arm
        if arm != "robust":
            assert row["seconds"]["scan"] > 0 and (row["auroc"] is None or 0 <= row["auroc"] <= 1), arm
        # the carriers (fewest poisons holding half the pull) and the rest partition the poisons: recalls add up
        carriers = row["carriers"]
        assert 1 <= carriers < 12 and row["poison_recall"] == pytest.approx(
            (carriers * row["carrier_recall"] + (12 - carriers) * row["rest_recall"]) / 12
        ), arm
    assert "carriers" not in rows["undefended"]
    # the scan followed by robust training: the scan's share is the scan arm's, and robust training removes more
    both, scanned = rows["scan-robust"], rows["scan"]
    assert both["scan_options"] == scanned["scan_options"]
    assert {name: both[f"scan_{name}"] for name in SCAN_PART} == {name: scanned[name] for name in SCAN_PART}
    assert both["dropped_fraction"] > scanned["dropped_fraction"] and both["poison_recall"] >= scanned["poison_recall"]
    assert (
        rows["spectral_signatures"]["told_expected_poisons"] == 12 and rows["deep_knn"]["told_expected_poisons"] == 12
    )
    knn, epic = dataclasses.asdict(KnnDensityOptions()), dataclasses.asdict(EpicOptions())
    recorded = {"detector": "knn_density"} | knn | epic | {"expected_poisons": None}
    # the proxy recorded as the architecture auto resolved to (this small set: the ConvNet)
    assert rows["scan"]["scan_options"] == recorded | {
        "proxy_epochs": ScanConfig().train.epochs,
        "proxy_model": "convnet",
    }
    assert list(rows["scan"]["scan_options"]) == [*SCAN_OPTIONS_RECORDED, "proxy_epochs", "proxy_model"]
    assert rows["deep_knn"]["scan_options"]["proxy_model"] == "convnet"  # the baselines reuse the default's proxy
    assert (
        rows["deep_knn"]["scan_options"]["detector"] == "deep_knn"
        and rows["deep_knn"]["scan_options"]["expected_poisons"] == 12
    )
    assert (
        rows["scan"]["told_expected_poisons"] is None and rows["activation_clustering"]["told_expected_poisons"] is None
    )
    assert rows["spectral_signatures"]["dropped_fraction"] >= 10 * 18 / 600  # 1.5 x 12 per class, by its rule
    harness = Harness(train, test, out, config, progress=False)
    assert Harness(train, test, out, dataclasses.replace(config, eps=16.0), progress=False).poisons_path(
        choose_setup(0, harness.train, harness.test, 0.02)
    ) == harness.poisons_path(choose_setup(0, harness.train, harness.test, 0.02))  # config above says eps=16, an int
    poisons = harness.poisons(choose_setup(0, harness.train, harness.test, config.budget), None)
    poisoned = harness.data_for("undefended", poisons).fingerprint
    assert all(
        harness.data_for(arm, poisons).fingerprint == poisoned for arm in arms[1:]
    )  # defenses filter the poisoned set
    assert harness.data_for("random-noise", poisons).fingerprint not in (poisoned, harness.train.fingerprint)
    summary = json.loads((out / "summary.json").read_text())
    paired = {t["arm"]: t for t in summary["paired"]}
    assert set(paired) == set(arms[1:]) and all(
        t["pairs"] == 1 and t["undefended_success"] == rows["undefended"]["success"] for t in paired.values()
    )
    assert all(t["carrier_recall"] == rows[arm]["carrier_recall"] for arm, t in paired.items())
    assert paired["scan"]["clean_acc_change"] == pytest.approx(
        rows["scan"]["clean_acc"] - rows["undefended"]["clean_acc"]
    )
    assert (
        "Paired with the undefended victims" in (out / "summary.md").read_text()
        and "Paired with the undefended" in (out / "report.html").read_text()
    )
    table = {t["arm"]: t for t in summary["table"]}
    assert table["scan"]["cost_vs_plain_training"] > 1 and table["undefended"][
        "cost_vs_plain_training"
    ] == pytest.approx(1)
    assert table["scan"]["cost_basis"] == "flops" and rows["scan"]["seconds"]["scan_cpu"] > 0
    assert rows["scan"]["flops"]["scan"] > 0 and all(r["flops"]["victim_training"] > 0 for r in rows.values())
    older = [dict(r, flops=None) for r in rows.values()]  # rows written before rows carried FLOPs
    assert _cost_vs_plain(older[1:2], older[:1])[1] == "cpu"


def test_the_calibration_filters_drop_exactly_the_poisons_or_as_many_random_examples_as_the_scan(tmp_path, split_npz):
    train, test = split_npz
    arms = ("undefended", "scan", "perfect-filter", "random-filter")
    config = EvaluationConfig(
        scale="smoke", keys=(0,), victims=1, eps=16, budget=0.02, epochs=2, iterations=3, arms=arms
    )
    out = run_evaluation(train, test, tmp_path / "eval", config, progress=False, command="test")
    rows = {r["arm"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    perfect, random_, scan = rows["perfect-filter"], rows["random-filter"], rows["scan"]
    assert perfect["poison_recall"] == 1 and perfect["poison_precision"] == 1 and perfect["carrier_recall"] == 1
    assert perfect["dropped_fraction"] == pytest.approx(12 / 600)
    assert random_["dropped_fraction"] == pytest.approx(scan["dropped_fraction"])
    assert random_["poison_recall"] < 1 and random_["auroc"] is None


def test_the_clean_and_random_noise_controls_train_no_surrogate_and_craft_nothing(tmp_path, split_npz):
    train, test = split_npz
    config = EvaluationConfig(
        scale="smoke",
        keys=(0, 1),
        victims=1,
        eps=16,
        budget=0.02,
        epochs=1,
        iterations=2,
        arms=("clean", "random-noise"),
        cache=str(tmp_path / "cache"),
    )
    out = run_evaluation(train, test, tmp_path / "eval", config, progress=False)
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["poison_key"], r["arm"]) for r in rows] == [
        (0, "clean"),
        (0, "random-noise"),
        (1, "clean"),
        (1, "random-noise"),
    ]
    assert all(r["seconds"]["crafting"] is None and r["craft_final_loss"] is None for r in rows)
    cached = sorted(path.name.split("-")[1] for path in (tmp_path / "cache").glob("*.pt"))
    assert cached == [
        "clean",
        "random",
        "random",
    ]  # one clean victim for both keys' targets, one control victim per key
    # --seeds picks victims by seed, so that processes can share one run: seed 0 is done, seed 2 is new, seed 1 not asked
    run_evaluation(
        train,
        test,
        tmp_path / "eval",
        dataclasses.replace(config, keys=(0,), arms=("clean",), seeds=(0, 2)),
        progress=False,
    )
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["poison_key"], r["arm"], r["victim_seed"]) for r in rows[4:]] == [(0, "clean", 2)]


def test_the_poisons_and_surrogate_are_published_beside_the_results_and_a_run_without_the_cache_reuses_them(
    tmp_path, split_npz, monkeypatch
):
    train, test = split_npz
    base = quick_smoke(tmp_path) | dict(arms=("undefended",))
    out = tmp_path / "eval"
    smoke = ["--scale", "smoke", "--keys", "0", "--budget", "0.02", "--epochs", "1", "--iterations", "2"]
    result = evaluate_cli(train, test, *smoke, "--cache", base["cache"], "--craft-only", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert not (out / "results.jsonl").exists()  # crafted and published, no victim
    published = list((out / "poisons").glob("poisons-gradient-matching-key0-eps16-*.npz"))
    assert len(published) == 1 and (tmp_path / "cache" / published[0].name).exists()
    surrogates = list((out / "surrogates").glob("surrogate-*.pt"))
    assert len(surrogates) == 1 and (tmp_path / "cache" / surrogates[0].name).exists()
    shutil.rmtree(tmp_path / "cache")  # a fresh machine: the results, their poisons and surrogate, nothing else

    def no_crafting(*args, **kwargs):
        raise AssertionError("crafted again although the poisons were published")

    trained = []
    monkeypatch.setattr("attacks.experiment.craft", no_crafting)
    monkeypatch.setattr(
        "attacks.trained.train_model",
        lambda *args, desc="train", **kwargs: trained.append(desc) or train_model(*args, desc=desc, **kwargs),
    )
    run_evaluation(
        train, test, out, EvaluationConfig(**base | {"arms": ("undefended", "scan")}, victims=2), progress=False
    )
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["victim_seed"] for r in rows] == [0, 1, 0, 1] and rows[0]["craft_final_loss"] == rows[1][
        "craft_final_loss"
    ]
    assert (
        trained and "surrogate" not in trained
    )  # victims trained; the surrogate the scan arm's carriers need was loaded
    assert (tmp_path / "cache" / published[0].name).exists()  # copied back for the benchmarks that read the cache


def test_a_scans_outcome_is_published_and_a_run_without_the_cache_trains_more_defended_victims_without_scanning(
    tmp_path, split_npz, monkeypatch
):
    train, test = split_npz
    out = tmp_path / "eval"
    base = quick_smoke(tmp_path) | dict(arms=("scan",))
    run_evaluation(train, test, out, EvaluationConfig(**base, victims=1), progress=False)
    (published,) = (out / "scans").glob("scan-*-knn_density.npz")
    first_copy = published.read_bytes()
    run_evaluation(train, test, out, EvaluationConfig(**base, victims=2), progress=False)
    assert published.read_bytes() == first_copy  # a second victim from the cache leaves the published copy as it was
    shutil.rmtree(tmp_path / "cache")  # a fresh machine: the results, their poisons, surrogate and scans

    def no_scan(*args, **kwargs):
        raise AssertionError("scanned again although the scan's outcome was published")

    monkeypatch.setattr("attacks.experiment.scan", no_scan)
    run_evaluation(train, test, out, EvaluationConfig(**base, victims=3), progress=False)
    rows = (json.loads(line) for line in (out / "results.jsonl").read_text().splitlines())
    first, *others = (row for row in rows if row["arm"] == "scan")
    assert [r["victim_seed"] for r in [first, *others]] == [0, 1, 2]
    for other_row in others:
        for field in ("dropped_fraction", "poison_precision", "poison_recall", "auroc", "scan_options"):
            assert first[field] == other_row[field], field
        assert first["seconds"]["scan"] == other_row["seconds"]["scan"]
        assert first["flops"]["scan"] == other_row["flops"]["scan"]
    other = dataclasses.replace(Harness(train, test, out, EvaluationConfig(**base)).train, fingerprint="other")
    assert load_scan_outcome(published, other) is None  # another data set's outcome is never used
    with np.load(published, allow_pickle=False) as stored:
        arrays = dict(stored)
    summary = json.loads(str(arrays["summary"]))
    summary["config"]["options"]["closed_group_conductance"] = 0.0  # flagged by a default that has changed since
    np.savez_compressed(published, **arrays | {"summary": np.array(json.dumps(summary))})
    with pytest.raises(AssertionError, match="scanned again"):  # a stale outcome is never used: the scan runs anew
        run_evaluation(train, test, out, EvaluationConfig(**base, victims=4), progress=False)
    monkeypatch.undo()  # a baseline not yet published needs the default scan's proxy: that scan runs for real
    run_evaluation(train, test, out, EvaluationConfig(**base | {"arms": ("deep_knn",)}, victims=1), progress=False)
    assert len(list((tmp_path / "cache").glob("scan-*/knn_density/proxy/model.pt"))) == 1
    assert len(list((out / "scans").glob("scan-*-deep_knn.npz"))) == 1


def test_a_current_published_scan_is_kept_and_used_when_another_machine_trains_its_proxy_again(tmp_path, split_npz):
    """A proxy trained again is not bit-identical: the published outcome the rows trained on stays the reference."""
    train, test = split_npz
    out = tmp_path / "eval"
    base = quick_smoke(tmp_path) | dict(arms=("scan",))
    run_evaluation(train, test, out, EvaluationConfig(**base, victims=1), progress=False)
    (published,) = (out / "scans").glob("scan-*-knn_density.npz")
    with np.load(published, allow_pickle=False) as stored:
        arrays = dict(stored)
    flags = np.unpackbits(arrays["flags"], count=int(arrays["count"])).astype(bool)
    flags[:7] = ~flags[:7]  # the outcome of another machine's proxy
    np.savez_compressed(published, **arrays | {"flags": np.packbits(flags)})
    reference = published.read_bytes()
    shutil.rmtree(tmp_path / "cache")
    # a baseline needs the default scan's proxy: trained again here, with flags of its own, and the reference stays
    run_evaluation(train, test, out, EvaluationConfig(**base | {"arms": ("deep_knn",)}, victims=1), progress=False)
    assert published.read_bytes() == reference
    run_evaluation(train, test, out, EvaluationConfig(**base, victims=2), progress=False)  # the cache has a folder now
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    (second,) = [r for r in rows if r["arm"] == "scan" and r["victim_seed"] == 1]
    assert second["dropped_fraction"] == pytest.approx(flags.mean())  # trained on the reference's flags
    assert published.read_bytes() == reference


def test_a_published_scan_is_the_same_outcome_up_to_float32_rounding_of_its_scores_and_never_with_other_flags(
    tmp_path,
):
    images = np.random.default_rng(0).integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    data = from_arrays(images, np.arange(40) % 4, ["a", "b", "c", "d"], "test")
    scores, flags = np.linspace(-2.0, 6.0, 40).astype(np.float32), np.arange(40) >= 36

    def outcome(scores: np.ndarray, flags: np.ndarray) -> ScanResult:
        return ScanResult(list(data.ids), list(data.paths), data.labels, scores, flags, {"config": {}}, files={})

    published = tmp_path / "scans" / "scan-x-knn_density.npz"
    save_scan_outcome(published, data, outcome(scores, flags), Cost(1.0, 1.0, 0.0))
    assert same_scan_outcome(published, data, outcome(scores + 7e-6, flags))  # another thread count's rounding
    assert not same_scan_outcome(published, data, outcome(scores + 0.01, flags))
    assert not same_scan_outcome(published, data, outcome(scores, np.roll(flags, 1)))
    assert not same_scan_outcome(tmp_path / "absent.npz", data, outcome(scores, flags))


def test_rows_name_their_poisons_and_a_defended_arm_gets_its_undefended_twin_on_the_same_poisons(tmp_path, split_npz):
    train, test = split_npz
    base = dict(
        scale="smoke", keys=(0,), eps=16, budget=0.02, epochs=1, iterations=2, victims=1, cache=str(tmp_path / "cache")
    )
    out = run_evaluation(
        train,
        test,
        tmp_path / "eval",
        EvaluationConfig(**base, arms=("clean", "undefended", "random-noise")),
        progress=False,
    )
    rows = {r["arm"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    published = next((out / "poisons").glob("*.npz"))
    harness = Harness(train, test, out, EvaluationConfig(**base), progress=False)
    digest = load_poisons(published, choose_setup(0, harness.train, harness.test, 0.02)).digest()
    assert (
        rows["undefended"]["poisons_sha256"] == digest
        and rows["clean"]["poisons_sha256"] is None
        and rows["random-noise"]["poisons_sha256"] is None
    )

    # the undefended row was trained on other poisons (say, crafted again elsewhere): a defended arm needs its twin
    results = out / "results.jsonl"
    results.write_text(results.read_text().replace(digest, "0" * 16))
    run_evaluation(train, test, out, EvaluationConfig(**base, arms=("undefended", "scan")), progress=False)
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [(r["arm"], r["poisons_sha256"]) for r in rows[3:]] == [("undefended", digest), ("scan", digest)]
    paired = json.loads((out / "summary.json").read_text())["paired"]
    assert [(t["arm"], t["pairs"]) for t in paired] == [("scan", 1)]

    # rows from before rows named their poisons count as done: nothing is trained again
    results.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "poisons_sha256"}) + "\n" for r in rows))
    run_evaluation(train, test, out, EvaluationConfig(**base, arms=("undefended", "scan")), progress=False)
    assert len(results.read_text().splitlines()) == len(rows)


def _synthetic_row(arm, seed, success, craft, poisons, attack="gradient-matching"):
    """A full-scale row as the evaluation writes it, with the attack's options changed by `craft`."""
    default = json.loads(json.dumps(dataclasses.asdict(attack_options(attack, **SCALES["full"].effort(attack)))))
    return {
            "attack": attack, "scale": "full", "model": "resnet18_cifar_w16", "epochs": 30, "eps": 16.0,
            "budget": 0.01, "poison_key": 0, "arm": arm, "victim_seed": seed, "success": success, "clean_acc": 0.85,
            "p_intended": 0.5, "dropped_fraction": 0.0, "poisons_sha256": poisons, "surrogates": 1,
            "craft_config": default | craft, "seconds": {"victim_training": 10.0},
            "flops": {"victim_training": 1.0, "scan": 0.5} if arm == "scan" else {"victim_training": 1.0},
    } | ({"scan_options": default_scan_options("knn_density", None)} if arm == "scan" else {})  # fmt: skip


def test_poisons_crafted_with_other_options_are_their_own_variant_paired_with_their_own_undefended_victims(tmp_path):
    row = _synthetic_row
    rows = [
        row("undefended", 0, True, {}, "plain"),
        row("scan", 0, True, {}, "plain"),
        row("undefended", 0, False, {"evade": 10.0}, "evading"),
        row("scan", 0, False, {"evade": 10.0}, "evading"),
        {k: v for k, v in row("clean", 0, False, {}, None).items() if k != "craft_config"},
    ]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = aggregate(tmp_path, command="test")
    table = {(t["arm"], t["variant"]): t for t in summary["table"]}
    assert set(table) == {
        ("undefended", ""),
        ("scan", ""),
        ("undefended", "evade=10.0"),
        ("scan", "evade=10.0"),
        ("clean", ""),
    }
    paired = {t["variant"]: t for t in summary["paired"]}
    assert paired[""]["undefended_success"] == 1.0 and paired["evade=10.0"]["undefended_success"] == 0.0
    assert (paired[""]["flipped_twins"], paired[""]["arm_success_where_twin_flipped"]) == (1, 1.0)
    assert (paired["evade=10.0"]["flipped_twins"], paired["evade=10.0"]["arm_success_where_twin_flipped"]) == (0, None)
    assert table[("scan", "evade=10.0")]["cost_vs_plain_training"] == pytest.approx(1.5)
    assert table[("clean", "")]["cost_vs_plain_training"] == pytest.approx(1.0)  # against the default attack's
    assert "scan (evade=10.0)" in (tmp_path / "summary.md").read_text()


def test_success_against_the_adaptive_attackers_weight_is_tabled_and_drawn_per_arm(tmp_path):
    rows = [
        _synthetic_row(arm, seed, success, {"anchor": weight} if weight else {}, f"w{weight}")
        for weight, undefended, scanned in ((0, (1, 1), (1, 0)), (1.0, (1, 0), (0, 0)), (10.0, (0, 0), (0, 0)))
        for arm, successes in (("undefended", undefended), ("scan", scanned))
        for seed, success in enumerate(successes)
    ]
    rows.append(_synthetic_row("undefended", 0, True, {"anchor": 1.0, "iterations": 10}, "other"))  # another sweep
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    swept = aggregate(tmp_path, command="test")["weight_sweeps"]
    sweeps = {t["arm"]: t for t in swept if not t["base"]}
    assert set(sweeps) == {"undefended", "scan"} and all(t["term"] == "anchor" for t in sweeps.values())
    # crafted with other iterations: a sweep of its own, with no plain attack crafted so to start from
    (other,) = [t for t in swept if t["base"]]
    assert (other["base"], other["arm"], [p["weight"] for p in other["points"]]) == (
        "iterations=10",
        "undefended",
        [1.0],
    )
    assert [(p["weight"], p["success"], p["victims"]) for p in sweeps["scan"]["points"]] == [
        (0.0, 0.5, 2),
        (1.0, 0.0, 2),
        (10.0, 0.0, 2),
    ]
    assert [p["success"] for p in sweeps["undefended"]["points"]] == [1.0, 0.5, 0.0]
    assert (
        "| 16 | 30 | anchor | - | scan | 0: 50.0% (2), 1: 0.0% (2), 10: 0.0% (2) |"
        in (tmp_path / "summary.md").read_text()
    )
    html = (tmp_path / "report.html").read_text()
    assert html.count('<svg class="sweep"') == 2 and html.count("<polyline") == 3
    assert 'points="0.0,75.0 180.0,150.0 360.0,150.0"' in html  # scan: 50%, 0%, 0% at evenly spaced weights
    # the same charts as standalone SVGs beside it, for the report's README
    charts = sorted(tmp_path.glob("success-vs-weight-*.svg"))
    assert len(charts) == 2
    (plain,) = [c for c in charts if "iterations" not in c.name]
    assert 'points="0.0,75.0 180.0,150.0 360.0,150.0"' in plain.read_text()


def test_a_sweep_of_poisons_crafted_with_another_option_starts_from_the_plain_attack_crafted_with_it(tmp_path):
    """MetaPoison's full-scale rows are all crafted with `ensemble=1`: its plain rows are the sweep's weight 0."""
    rows = [
        _synthetic_row("undefended", seed, success, {"ensemble": 1} | craft, name, attack="metapoison")
        for craft, name, successes in (
            ({}, "plain", (True, False)),
            ({"evade": 0.1}, "w0.1", (False,)),
            ({"evade": 0.1, "evade_scope": "all"}, "w0.1-all", (True,)),
        )
        for seed, success in enumerate(successes)
    ]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    batch, everywhere = aggregate(tmp_path, command="test")["weight_sweeps"]
    assert (batch["base"], batch["term"]) == ("ensemble=1", "evade (spread)")
    assert [(p["weight"], p["success"], p["victims"]) for p in batch["points"]] == [(0.0, 0.5, 2), (0.1, 0.0, 1)]
    # the scope over all poisons is a sweep of its own from the same plain attack, not a point of the batch's
    assert (everywhere["base"], everywhere["term"]) == ("ensemble=1", "evade (spread, all poisons)")
    assert [(p["weight"], p["success"]) for p in everywhere["points"]] == [(0.0, 0.5), (0.1, 1.0)]
    assert "(ensemble=1), full" in (tmp_path / "report.html").read_text()


def test_a_detector_row_scanned_under_an_older_default_is_its_own_variant_and_the_arm_runs_again(tmp_path, split_npz):
    train, test = split_npz
    config = EvaluationConfig(
        scale="smoke",
        keys=(0,),
        eps=16,
        budget=0.02,
        epochs=1,
        iterations=2,
        victims=1,
        cache=str(tmp_path / "cache"),
        arms=("undefended", "scan", "deep_knn"),
    )
    out = run_evaluation(train, test, tmp_path / "eval", config, progress=False)
    results = out / "results.jsonl"
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    for row in rows:  # as if scanned before the default alarm moved: knn_density's option, which deep_knn does not use
        if row["arm"] != "undefended":
            row["scan_options"]["class_alarm_p"] = 1e-6
            del row["scan_options"][
                "alarm_confidence"
            ]  # and before that option was recorded: read as its value then (0)
            del row["scan_options"]["proxy_model"]  # and before the proxy was always recorded: auto, the ConvNet then
    results.write_text("".join(json.dumps(row) + "\n" for row in rows))
    run_evaluation(train, test, out, config, progress=False)
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [row["arm"] for row in rows[3:]] == ["scan"]  # no twin: the undefended row is on these poisons
    assert rows[3]["scan_options"]["class_alarm_p"] == KnnDensityOptions().class_alarm_p
    summary = json.loads((out / "summary.json").read_text())
    crafted = "iterations=2"  # every row's poisons: the smoke scale crafts with 20
    old = f"{crafted}; class_alarm_p=1e-06, alarm_confidence=0.0"
    assert {(t["arm"], t["variant"]) for t in summary["table"]} == {
        ("undefended", crafted),
        ("scan", crafted),
        ("scan", old),
        ("deep_knn", crafted),
    }
    assert {(t["arm"], t["variant"]) for t in summary["paired"]} == {
        ("scan", crafted),
        ("scan", old),
        ("deep_knn", crafted),
    }
    assert f"| scan ({old}) |" in (out / "summary.md").read_text() and f"({old})" in (out / "report.html").read_text()


def test_a_scan_option_is_a_variant_of_the_scan_arm_recorded_resumed_and_kept_apart(tmp_path, split_npz):
    train, test = split_npz
    base = dict(scale="smoke", keys=(0,), eps=16, budget=0.02, epochs=1, iterations=2, victims=1)
    base |= {"cache": str(tmp_path / "cache"), "arms": ("undefended", "scan")}
    out = tmp_path / "eval"
    variant = {"class_alarm_p": 0.3, "threshold": 0.3}
    run_evaluation(train, test, out, EvaluationConfig(**base, scan_options=variant), progress=False)
    run_evaluation(train, test, out, EvaluationConfig(**base, scan_options=variant), progress=False)  # all done
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["arm"] for r in rows] == ["undefended", "scan"]
    assert rows[1]["scan_options"]["class_alarm_p"] == 0.3 and rows[1]["scan_options"]["threshold"] == 0.3
    run_evaluation(train, test, out, EvaluationConfig(**base), progress=False)  # the default is another arm's row
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["arm"] for r in rows] == ["undefended", "scan", "scan"]
    assert rows[1]["dropped_fraction"] >= rows[2]["dropped_fraction"]  # the looser cut flags at least as much
    # each rule publishes its own outcome: the variant's never stands under the default's name, nor the reverse
    (default_copy,) = (out / "scans").glob("scan-*-knn_density.npz")
    (variant_copy,) = (out / "scans").glob("scan-*-knn_density-rule-*.npz")
    for copy, threshold in ((default_copy, KnnDensityOptions().threshold), (variant_copy, 0.3)):
        with np.load(copy, allow_pickle=False) as stored:
            assert json.loads(str(stored["summary"]))["config"]["options"]["threshold"] == threshold
    summary = json.loads((out / "summary.json").read_text())
    assert {(t["arm"], t["variant"]) for t in summary["table"]} == {
        ("undefended", "iterations=2"),  # the poisons: the smoke scale crafts with 20
        ("scan", "iterations=2"),
        ("scan", "iterations=2; class_alarm_p=0.3, threshold=0.3"),
    }
    with pytest.raises(SanitizeError, match="unknown option"):
        run_evaluation(train, test, out, EvaluationConfig(**base, scan_options={"nope": 1}), progress=False)


def test_the_combined_scan_arm_removes_the_union_of_the_default_and_the_option_scans_flags(tmp_path, split_npz):
    train, test = split_npz
    base = dict(scale="smoke", keys=(0,), eps=16, budget=0.02, epochs=1, iterations=2, victims=1)
    base |= {"cache": str(tmp_path / "cache"), "arms": ("undefended", "scan", "scan-combined")}
    out = tmp_path / "eval"
    with pytest.raises(SanitizeError, match="needs --scan-option"):
        run_evaluation(train, test, out, EvaluationConfig(**base), progress=False)
    assert not (out / "results.jsonl").exists()  # refused before anything is crafted or trained
    run_evaluation(train, test, out, EvaluationConfig(**base | {"arms": ("undefended", "scan")}), progress=False)
    seeded = EvaluationConfig(**base, scan_options={"seed": 1})
    run_evaluation(train, test, out, seeded, progress=False)  # the seeded scan, then both combined
    run_evaluation(train, test, out, seeded, progress=False)  # all done
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["arm"] for r in rows] == ["undefended", "scan", "scan", "scan-combined"]
    default, other, combined = (r["dropped_fraction"] for r in rows[1:])
    assert max(default, other) <= combined <= default + other and combined > min(default, other)
    assert rows[3]["scan_options"] == rows[2]["scan_options"] | {"combined_with_default": True}
    assert rows[3]["scan_options"]["proxy_seed"] == 1 and rows[3]["auroc"] is None
    outcomes = [np.load(p, allow_pickle=False) for p in sorted((out / "scans").glob("scan-*.npz"))]
    union = np.logical_or.reduce([np.unpackbits(o["flags"])[: int(o["count"])].astype(bool) for o in outcomes])
    assert len(outcomes) == 2 and union.mean() == pytest.approx(combined)


def test_a_rule_change_on_another_proxy_reuses_that_proxy_and_publishes_its_own_outcome(tmp_path, split_npz):
    train, test = split_npz
    base = dict(scale="smoke", keys=(0,), eps=16, budget=0.02, epochs=1, iterations=2, victims=1)
    base |= {"cache": str(tmp_path / "cache"), "arms": ("undefended", "scan")}
    out = tmp_path / "eval"
    for variant in ({"seed": 1}, {"seed": 1, "threshold": 0.3}):
        run_evaluation(train, test, out, EvaluationConfig(**base, scan_options=variant), progress=False)
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["arm"], r["scan_options"].get("threshold")) for r in rows[1:]] == [("scan", 0.5), ("scan", 0.3)]
    assert rows[2]["dropped_fraction"] >= rows[1]["dropped_fraction"]  # the looser cut on the same proxy
    (scans,) = (tmp_path / "cache").glob("scan-*")
    assert len(list(scans.glob("knn_density-*/proxy"))) == 1  # one seed-1 proxy, trained once
    assert len(list((out / "scans").glob("scan-*-knn_density-*-rule-*.npz"))) == 1


def test_a_scan_with_another_proxy_seed_is_recorded_and_is_not_the_default_scans_defense():
    """A scan arm under --scan-option seed=N is its own defense, its rows kept apart from the default scan's."""
    default, seeded = default_scan_options("knn_density", None), default_scan_options("knn_density", None, seed=7)
    assert "proxy_seed" not in default and seeded["proxy_seed"] == 7
    assert defense_key(seeded) != defense_key(default)


def test_a_robust_option_is_a_variant_of_the_robust_arm_recorded_resumed_and_kept_apart(tmp_path, split_npz):
    train, test = split_npz
    base = dict(scale="smoke", keys=(0,), eps=16, budget=0.02, epochs=3, iterations=2, victims=1)
    base |= {"cache": str(tmp_path / "cache"), "arms": ("undefended", "robust")}
    out = tmp_path / "eval"
    capped = {"max_dropped_fraction": 0.005}  # well below what the default cap lets go here (2-3%)
    run_evaluation(train, test, out, EvaluationConfig(**base, robust_options=capped), progress=False)
    run_evaluation(train, test, out, EvaluationConfig(**base, robust_options=capped), progress=False)  # all done
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["arm"] for r in rows] == ["undefended", "robust"]
    assert rows[1]["robust_options"] == capped and 0 < rows[1]["dropped_fraction"] <= 0.005
    named_default = {"max_dropped_fraction": 0.1}  # the default, named: the default arm's row, recorded as such
    run_evaluation(train, test, out, EvaluationConfig(**base, robust_options=named_default), progress=False)
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["arm"] for r in rows] == ["undefended", "robust", "robust"] and "robust_options" not in rows[2]
    assert rows[2]["dropped_fraction"] > rows[1]["dropped_fraction"]  # the default cap lets more go
    summary = json.loads((out / "summary.json").read_text())
    assert {(t["arm"], t["variant"]) for t in summary["table"]} == {
        ("undefended", "iterations=2"),
        ("robust", "iterations=2"),
        ("robust", "iterations=2; robust max_dropped_fraction=0.005"),
    }
    pooled = {"pool_runs": 2}  # a first round pooled with one scout, whose round is kept beside the drop log
    run_evaluation(train, test, out, EvaluationConfig(**base, robust_options=pooled), progress=False)
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and rows[3]["robust_options"] == pooled
    assert len(list((tmp_path / "cache").rglob("*.drop_log.scout1.npz"))) == 1
    assert not list((tmp_path / "cache").rglob("*scout-seed*"))  # the scout's checkpoint is removed
    for bad, message in (
        ({"epochs": 3}, "unknown robust option"),
        ({"warmup": "late"}, "takes a number"),
        ({"spread_cap": 1}, "takes true or false"),
        ({"max_dropped_fraction": True}, "takes a number"),
        ({"pool_runs": 0}, "pool_runs must be >= 1"),
    ):
        with pytest.raises(SanitizeError, match=message):
            run_evaluation(train, test, out, EvaluationConfig(**base, robust_options=bad), progress=False)
    result = evaluate_cli(train, test, "--robust-option", "fraction=2", "--out", str(tmp_path / "e"))
    assert result.exit_code == 2 and "fraction must be in (0, 1]" in result.output, result.output


def test_the_noise_arms_train_their_victims_with_noise_record_it_and_keep_another_noise_apart(tmp_path, split_npz):
    train, test = split_npz
    base = dict(scale="smoke", keys=(0,), eps=16, budget=0.02, epochs=2, iterations=2, victims=1)
    base |= {"cache": str(tmp_path / "cache"), "arms": ("noise-training", "friendly-noise")}
    out = tmp_path / "eval"
    run_evaluation(train, test, out, EvaluationConfig(**base), progress=False)
    run_evaluation(train, test, out, EvaluationConfig(**base), progress=False)  # all done: nothing added
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["arm"] for r in rows] == ["undefended", "noise-training", "friendly-noise"]  # with the undefended twin
    assert [r.get("noise_eps") for r in rows] == [None, 16.0, 16.0]
    assert rows[1]["dropped_fraction"] == 0.0 and rows[1]["flops"] == rows[0]["flops"]  # random noise costs nothing
    size, flops = rows[0]["train_size"], example_flops("tiny", 10, (3, 16, 16)).train
    friendly_flops = rows[2]["flops"]["victim_training"] - rows[0]["flops"]["victim_training"]
    assert friendly_flops == pytest.approx(STEPS * size * flops)  # friendly noise: STEPS passes over the data
    names = sorted("-".join(p.name.split("-")[1:-1]) for p in (tmp_path / "cache").glob("victim-*.pt"))
    assert names == ["friendly-noise", "noise-training", "undefended"]
    run_evaluation(
        train, test, out, EvaluationConfig(**base | {"arms": ("noise-training",)}, noise_eps=8), progress=False
    )
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["arm"], r.get("noise_eps")) for r in rows[1:]] == [
        ("noise-training", 16.0),
        ("friendly-noise", 16.0),
        ("noise-training", 8.0),
    ]
    assert rows[1]["clean_acc"] != rows[3]["clean_acc"] or rows[1]["p_intended"] != rows[3]["p_intended"]
    summary = json.loads((out / "summary.json").read_text())
    assert {(t["arm"], t["variant"]) for t in summary["table"]} == {
        ("undefended", "iterations=2"),
        ("noise-training", "iterations=2"),
        ("friendly-noise", "iterations=2"),
        ("noise-training", "iterations=2; noise_eps=8"),
    }
    result = evaluate_cli(train, test, "--arms", "noise-training", "--noise-eps", "0", "--out", str(tmp_path / "e"))
    assert result.exit_code == 2 and "noise_eps must be in (0, 255]" in result.output, result.output


def test_a_detector_that_flags_nothing_reuses_the_undefended_victim(tmp_path, split_npz, monkeypatch):
    train, test = split_npz

    def flags_nothing(self, poisoned, arm, setup):
        flags = np.zeros(len(poisoned), dtype=bool)
        return (
            poisoned.subset(np.arange(len(poisoned))),
            flags,
            {"dropped_fraction": 0.0, "poison_precision": None, "poison_recall": 0.0, "auroc": None},
            Cost(1.0, 1.0),
        )

    monkeypatch.setattr(Harness, "filtered", flags_nothing)
    config = EvaluationConfig(
        scale="smoke",
        keys=(0,),
        victims=1,
        eps=16,
        budget=0.02,
        epochs=1,
        iterations=2,
        arms=("undefended", "activation_clustering"),
        cache=str(tmp_path / "cache"),
    )
    out = run_evaluation(train, test, tmp_path / "eval", config, progress=False)
    rows = {r["arm"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert rows["activation_clustering"]["clean_acc"] == rows["undefended"]["clean_acc"]
    assert not list(
        (tmp_path / "cache").glob("victim-activation_clustering-*")
    )  # no second training of the same victim
    assert rows["activation_clustering"]["victim_of"] == "undefended"  # the twin's row is its measurement

    # a machine without the cached victims: the twin's row is the measurement, and nothing trains
    for victim in (tmp_path / "cache").glob("victim-*"):
        victim.unlink()
    config = dataclasses.replace(config, arms=("epic",))
    run_evaluation(train, test, tmp_path / "eval", config, progress=False)
    rows = {r["arm"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert rows["epic"]["victim_of"] == "undefended"
    twin = rows["undefended"]
    assert [rows["epic"][name] for name in ("target_pred", "p_intended", "clean_acc", "run")] == [
        twin[name] for name in ("target_pred", "p_intended", "clean_acc", "run")
    ]
    assert rows["epic"]["flops"]["victim_training"] == twin["flops"]["victim_training"]
    assert not list((tmp_path / "cache").glob("victim-*"))


def test_two_shards_that_plan_the_same_victim_train_it_once_and_write_one_row(tmp_path, split_npz, monkeypatch):
    """Two evaluations sharing a cache and a results file (a defended arm's shard plans the undefended twin another
    shard is training): the second waits for the victim, loads it, and adds no row of its own."""
    train, test = split_npz
    planned = threading.Barrier(2, timeout=120)
    plan = Harness.plan

    def plan_then_wait(self, *args):
        todo = plan(self, *args)
        planned.wait()  # both shards have planned the victim before either trains it
        return todo

    trainings = []

    def counted(*args, **kwargs):
        trainings.append(kwargs.get("desc"))
        return train_model(*args, **kwargs)

    monkeypatch.setattr(Harness, "plan", plan_then_wait)
    monkeypatch.setattr("attacks.trained.train_model", counted)
    config = EvaluationConfig(
        scale="smoke", keys=(0,), victims=1, epochs=1, arms=("clean",), cache=str(tmp_path / "cache")
    )
    errors = []

    def shard():
        try:
            run_evaluation(train, test, tmp_path / "eval", config, progress=False)
        except Exception as error:  # noqa: BLE001 - reported by the assertion below
            errors.append(error)

    shards = [threading.Thread(target=shard) for _ in range(2)]
    for thread in shards:
        thread.start()
    for thread in shards:
        thread.join(300)
    assert not errors and trainings == ["victim-clean"]
    assert len((tmp_path / "eval" / "results.jsonl").read_text().splitlines()) == 1


def test_a_victim_resumed_from_a_checkpoint_without_cpu_times_trains_and_reports_no_cpu_cost(tmp_path, split_npz):
    train, test = split_npz
    config = EvaluationConfig(scale="smoke", keys=(0,), victims=1, epochs=2, cache=str(tmp_path / "cache"))
    harness = Harness(train, test, tmp_path / "eval", config, progress=False)
    final = harness.models.path(harness.train, 0, "victim-clean")
    partial = final.with_suffix(".partial.pt")

    def killed_after_the_first_epoch(epoch, _model, indices):
        if epoch == 1:
            raise KeyboardInterrupt
        return indices

    with pytest.raises(KeyboardInterrupt):
        train_model(
            harness.models.new_model(0),
            harness.train,
            np.arange(len(harness.train)),
            dataclasses.replace(harness.recipe, seed=0),
            CPU_DEVICE,
            None,
            checkpoint=partial,
            meta={"name": final.stem},
            progress=False,
            after_epoch=killed_after_the_first_epoch,
        )
    state = torch.load(partial, weights_only=True)
    for epoch in state["history"]:
        del epoch["cpu_seconds"]  # as written before rows carried CPU time
    torch.save(state, partial)
    _, cost = harness.models.trained(harness.train, 0, "victim-clean")
    assert cost.wall > 0 and cost.cpu is None and final.exists()
    flops = example_flops(harness.scale.model, 10, (3, *harness.train.image_size), **harness.scale.model_kwargs)
    assert cost.flops == trained_examples(len(harness.train), 2, harness.recipe.batch_size) * flops.train


def test_model_override_is_a_separate_ablation_with_its_own_surrogate_and_poisons(tmp_path, split_npz):
    train, test = split_npz
    base = quick_smoke(tmp_path) | dict(victims=1, arms=("undefended",))
    out = tmp_path / "eval"
    run_evaluation(train, test, out, EvaluationConfig(**base), progress=False)
    run_evaluation(train, test, out, EvaluationConfig(**base, model="convnet"), progress=False)
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["model"] for r in rows] == ["tiny", "convnet"]
    assert len(list((tmp_path / "cache").glob("surrogate-*.pt"))) == 2
    assert (
        len(list((tmp_path / "cache").glob("poisons-*.npz"))) == 2
    )  # poisons are keyed by the surrogate they were crafted on


def test_truncated_results_line_is_a_clear_error(tmp_path):
    good = json.dumps({k: 0 for k in ROW_REQUIRED - {"seconds"}} | {"seconds": {}})
    (tmp_path / "results.jsonl").write_text(good + '\n{"attack": ')
    with pytest.raises(SanitizeError, match="2 is not a JSON line"):
        aggregate(tmp_path)
    (tmp_path / "results.jsonl").write_text('{"attack": "x"}\n')
    with pytest.raises(SanitizeError, match="1 lacks arm"):
        aggregate(tmp_path)


def test_bad_options_are_clear_errors(tmp_path, split_npz, digits_folder):
    train, test = split_npz
    with pytest.raises(SanitizeError, match="unknown arm"):
        run_evaluation(
            train, test, tmp_path / "e", EvaluationConfig(scale="smoke", arms=("clean", "sometimes")), progress=False
        )
    assert parse_keys("0-3,7") == (0, 1, 2, 3, 7)
    result = evaluate_cli(train, test, "--keys", "a-b", "--out", str(tmp_path / "e"))
    assert result.exit_code == 2 and "bad --keys" in result.output
    result = evaluate_cli(train, test, "--seeds", "4-x", "--out", str(tmp_path / "e"))
    assert result.exit_code == 2 and "bad --seeds" in result.output
    result = CliRunner().invoke(
        cli, ["attack", str(digits_folder), "--test", str(test), "--out", str(digits_folder / "poisoned")]
    )
    assert result.exit_code == 2 and "never writes into the data" in result.output
    assert not (digits_folder / "poisoned").exists()


def test_attack_command_writes_a_poisoned_copy(tmp_path, split_npz):
    train, test = split_npz
    result = CliRunner().invoke(
        cli,
        [
            "attack",
            str(train),
            "--test",
            str(test),
            "--key",
            "2",
            "--budget",
            "0.02",
            "--model",
            "tiny",
            "--epochs",
            "1",
            "--iterations",
            "2",
            "--restarts",
            "1",
            "--out",
            str(tmp_path / "p"),
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "p" / "poison_manifest.json").read_text())
    assert len(manifest["poison_ids"]) == 30 and manifest["method"] == "gradient-matching"
    poisoned = np.load(tmp_path / "p" / "data.npz", allow_pickle=False)
    original = np.load(train, allow_pickle=False)
    changed = np.flatnonzero((poisoned["x"] != original["x"]).any(axis=(1, 2, 3)))
    assert set(changed) <= set(manifest["poison_indices"]) and len(changed) > 0


def test_overrides_reach_the_recipe_and_the_attack_and_are_recorded(tmp_path, split_npz):
    """--no-augment trains surrogate and victims without crop + flip; --craft-option sets the attack's own option."""
    train, test = split_npz
    smoke = ["--scale", "smoke", "--keys", "0", "--victims", "1", "--budget", "0.02", "--epochs", "1"]
    result = evaluate_cli(
        train,
        test,
        *smoke,
        *["--iterations", "2", "--arms", "undefended,clean", "--no-augment"],
        *["--craft-option", "augment=false", "--craft-option", "max_shift=2", "--lr", "0.05", "--surrogates", "2"],
        *["--precision", "fp32", "--out", str(tmp_path / "e"), "--quiet"],
    )
    assert result.exit_code == 0, result.output
    rows = {r["arm"]: r for r in map(json.loads, (tmp_path / "e" / "results.jsonl").read_text().splitlines())}
    assert all(row["run"]["precision"] == "fp32" for row in rows.values())  # forced, whatever the machine runs natively
    assert rows["undefended"]["augment"] is False and rows["clean"]["augment"] is False
    assert (
        rows["undefended"]["craft_config"]["augment"] is False and rows["undefended"]["craft_config"]["max_shift"] == 2
    )
    assert rows["clean"]["craft_config"] is None and rows["undefended"]["surrogates"] == 2
    published = sorted((tmp_path / "e" / "surrogates").glob("surrogate-*.pt"))
    assert len(published) == 2  # the ensemble: two surrogates of other seeds, each published
    (poisons,) = (tmp_path / "e" / "poisons").glob("*.npz")
    assert json.loads(str(np.load(poisons)["metadata"]))["surrogates"] == 2
    assert EvaluationConfig(scale="smoke", lr=0.05).resolved()[1].lr == 0.05
    config = EvaluationConfig(scale="smoke", augment=False, craft_options={"augment": False})
    assert not config.resolved()[1].augment and not config.resolved()[2].augment
    for bad, message in (
        ("restarts=two", "must be int"),
        ("lr", "NAME=VALUE"),
        ("colour=1", "NAME=VALUE"),
        ("augment=maybe", "must be bool"),
    ):
        result = evaluate_cli(train, test, "--craft-option", bad, "--out", str(tmp_path / "bad"))
        assert result.exit_code == 2 and message in result.output, (bad, result.output)
    with pytest.raises(SanitizeError, match="has no option"):
        EvaluationConfig(scale="smoke", craft_options={"colour": 1}).resolved()


@pytest.mark.parametrize("scale, restarts", [("cpu", 4), ("full", 4), ("paper", 8)])
def test_a_scales_gradient_matching_effort_is_not_every_attacks(scale, restarts):
    """The 250 steps and restarts of gradient matching's paper belong to it: MetaPoison at the same scale crafts at its
    own defaults (61 steps, one restart), and a run's --iterations still overrides either."""
    matching = EvaluationConfig(scale=scale).resolved()[2]
    assert (matching.iterations, matching.restarts) == (250, restarts)
    metapoison = EvaluationConfig(scale=scale, attack="metapoison").resolved()[2]
    defaults = attack_options("metapoison")
    assert (metapoison.iterations, metapoison.restarts) == (defaults.iterations, defaults.restarts) == (61, 1)
    assert EvaluationConfig(scale=scale, attack="metapoison", iterations=5).resolved()[2].iterations == 5


def test_retraining_during_crafting_trains_surrogates_on_the_current_poisons(tmp_path, split_npz, monkeypatch):
    """retrain_every: every k iterations the surrogates are trained again from scratch on the data holding the poisons
    crafted so far, and crafting goes on against them (Sleeper Agent's re-training); the poisons get their own name."""
    train, test = split_npz
    calls = []
    real = Harness.retrainer

    def recording(self, setup):
        retrain = real(self, setup)

        def wrapped(deltas, iteration):
            calls.append((iteration, deltas.dtype, int(deltas.abs().max())))
            return retrain(deltas, iteration)

        return wrapped

    monkeypatch.setattr(Harness, "retrainer", recording)
    config = EvaluationConfig(
        **quick_smoke(tmp_path) | dict(iterations=5, victims=1, arms=("undefended",)),
        craft_options={"retrain_every": 2},
    )
    run_evaluation(train, test, tmp_path / "e", config, progress=False)
    assert [(i, dtype) for i, dtype, _ in calls] == [(2, torch.int16), (4, torch.int16)]
    assert all(0 < largest <= 16 for *_, largest in calls)
    assert len(list((tmp_path / "cache").glob("surrogate-retrained-*.pt"))) == 2
    plain = Harness(train, test, tmp_path / "p", EvaluationConfig(**quick_smoke(tmp_path)), progress=False)
    setup = choose_setup(0, plain.train, plain.test, 0.02)
    assert Harness(train, test, tmp_path / "p", config, progress=False).poisons_path(setup) != plain.poisons_path(setup)
    with pytest.raises(SanitizeError, match="retrain_every needs"):
        craft_options = attack_options("gradient-matching", retrain_every=2, iterations=3, restarts=1)
        craft(
            "gradient-matching",
            plain.surrogates()[0],
            plain.train,
            plain.test.load_image(setup.target_index),
            setup,
            16,
            craft_options,
            device=torch.device("cpu"),
            progress=False,
        )


def test_gradient_norm_selection_takes_the_intended_class_images_with_the_largest_gradients(tmp_path, split_npz):
    train, test = split_npz
    harness = Harness(train, test, tmp_path / "e", EvaluationConfig(**quick_smoke(tmp_path)), progress=False)
    models, _ = harness.surrogates()
    setup = choose_setup(0, harness.train, harness.test, 0.02)
    assert select_poisons(setup, "random", models, harness.train) == setup
    chosen = select_poisons(setup, "gradient-norm", models, harness.train)
    assert len(chosen.poison_indices) == len(setup.poison_indices) and chosen.poison_indices != setup.poison_indices
    pool = np.flatnonzero(harness.train.labels == setup.intended_class)
    norms = dict(zip(pool.tolist(), gradient_norms(models, harness.train, pool)))
    picked = [norms[i] for i in chosen.poison_indices]
    assert min(picked) >= max(v for i, v in norms.items() if i not in chosen.poison_indices)
    with pytest.raises(SanitizeError, match="selection must be"):
        select_poisons(setup, "loudest", models, harness.train)
    config = EvaluationConfig(
        **quick_smoke(tmp_path) | dict(victims=1, arms=("undefended",)), craft_options={"selection": "gradient-norm"}
    )
    run_evaluation(train, test, tmp_path / "s", config, progress=False)
    (stored,) = (tmp_path / "s" / "poisons").glob("*.npz")
    assert tuple(np.load(stored)["poison_indices"].tolist()) == chosen.poison_indices


def test_evading_in_the_proxy_space_trains_the_scans_recipe_on_the_current_poisons_into_the_cache(tmp_path, split_npz):
    train, test = split_npz
    out = tmp_path / "eval"
    options = ["--craft-option", "evade=1", "--craft-option", "evade_space=proxy", "--craft-option", "evade_refresh=1"]
    smoke = ["--scale", "smoke", "--keys", "0", "--budget", "0.02", "--epochs", "1", "--iterations", "2"]
    result = evaluate_cli(
        train, test, *smoke, *options, "--cache", str(tmp_path / "cache"), "--craft-only", "--out", str(out)
    )
    assert result.exit_code == 0, result.output
    proxies = sorted((tmp_path / "cache").glob("evade-proxy-*.pt"))
    assert len(proxies) == 2  # at the first step and after one (evade_refresh=1, two iterations)
    state = torch.load(proxies[0], map_location="cpu", weights_only=True)
    assert state["model"]  # a proxy of the scan's own architecture (its state dict)
    (published,) = (out / "poisons").glob("poisons-gradient-matching-key0-eps16-*.npz")
    with np.load(published, allow_pickle=False) as stored:
        config = json.loads(str(stored["metadata"]))["config"]
    assert config["evade_space"] == "proxy" and config["evade_refresh"] == 1


def proxies_trained(tmp_path, split_npz, monkeypatch, iterations: int, **craft_options) -> tuple[Harness, list]:
    """The evaluation and (seed, tag, architecture, recipe) of each proxy its evasion trains over `iterations`
    refreshes (`ModelCache.trained` recorded, not run)."""
    train, test = split_npz
    craft_options = {"evade": 1.0, "evade_space": "proxy", **craft_options}
    config = EvaluationConfig(**quick_smoke(tmp_path), craft_options=craft_options)
    harness = Harness(train, test, tmp_path / "e", config, progress=False)
    trained = []
    monkeypatch.setattr(
        ModelCache,
        "trained",
        lambda self, data, seed, tag: trained.append((seed, tag, self.model, self.recipe)) or (None, None),
    )
    setup = choose_setup(0, harness.train, harness.test, 0.02)
    deltas = torch.zeros((len(setup.poison_indices), 3, *harness.train.image_size), dtype=torch.int16)
    train_on = harness.proxy_trainer(setup)
    for iteration in range(iterations):
        train_on(deltas, iteration)
    return harness, trained


@pytest.mark.parametrize(
    "seeds, expected", [("own", [EVADE_PROXY_SEED, EVADE_PROXY_SEED + 1000]), ("scan", [ScanConfig().seed] * 2)]
)
def test_the_evasions_proxies_train_with_the_attackers_seeds_or_the_scans(
    tmp_path, split_npz, monkeypatch, seeds, expected
):
    """evade_seed=own: a seed of the attacker's own a refresh; scan: the default scan's seed every time."""
    harness, trained = proxies_trained(tmp_path, split_npz, monkeypatch, 2, evade_seed=seeds)
    proxy = resolve_model_name(ScanConfig().model, harness.train.image_size)
    assert [(seed, tag, model) for seed, tag, model, _ in trained] == [
        (seed, "evade-proxy", proxy) for seed in expected
    ]


@pytest.mark.parametrize("model", ["scan", "tiny"])
def test_the_evasions_proxies_have_the_default_scans_recipe_and_architecture_or_the_one_named(
    tmp_path, split_npz, monkeypatch, model
):
    """evade_model=scan: the default scan's proxy; a registry name: the proxy `sanitize scan --model` trains."""
    harness, (trained,) = proxies_trained(tmp_path, split_npz, monkeypatch, 1, evade_model=model)
    default = resolve_model_name(ScanConfig().model, harness.train.image_size)
    assert trained[2:] == (default if model == "scan" else model, ScanConfig().train)


def test_the_evasion_imitates_several_proxies_joined_by_plus_each_with_the_scans_recipe(
    tmp_path, split_npz, monkeypatch
):
    """evade_model=scan+tiny: a proxy of each architecture at every refresh, with the same seeds."""
    harness, trained = proxies_trained(tmp_path, split_npz, monkeypatch, 2, evade_model="scan+tiny", evade_seed="scan")
    default = resolve_model_name(ScanConfig().model, harness.train.image_size)
    seed = ScanConfig().seed
    assert trained == [(seed, "evade-proxy", model, ScanConfig().train) for model in (default, "tiny")] * 2
