"""Back-gradient poisoning: the hypergradient through the unrolled training is the true one, crafting beats its own
label-flip start on a victim it never saw, and the evaluation writes a row per seed, fraction and arm and resumes."""

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from attacks.back_gradient import (
    LEARNERS,
    BackGradientOptions,
    craft_back_gradient,
    get_learner,
    objective,
    predict,
    train,
)
from attacks.evaluate_back_gradient import (
    BackGradientConfig,
    load_points,
    run_back_gradient_evaluation,
    write_summary,
)
from sanitize.cli import cli
from sanitize.errors import SanitizeError


@pytest.fixture(scope="module")
def digits():
    """The 8x8 digits split as the evaluation splits seed 0: 600 train, 600 validation, the rest test."""
    images, labels = load_points(None)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    parts = order[:600], order[600:1200], order[1200:]
    return [(images[p], labels[p]) for p in parts]


@pytest.mark.parametrize("learner", sorted(LEARNERS))
def test_the_hypergradient_matches_finite_differences(learner):
    """d objective / d poison pixel through the unrolled steps, against a central difference in float64."""
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(12, 1, 4, 4, generator=generator, dtype=torch.float64)
    y = torch.arange(12) % 3
    x_val, y_val = torch.rand(9, 1, 4, 4, generator=generator, dtype=torch.float64), torch.arange(9) % 3
    chosen = get_learner(learner)
    short = type(chosen)(**{**chosen.__dict__, "steps": 5})
    init = [p.double() for p in short.init((1, 4, 4), 3, torch.Generator().manual_seed(1))]
    options = BackGradientOptions(learner=learner)
    poison = torch.rand(2, 1, 4, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 2])

    def value(p):
        params = train(short, torch.cat([x, p]), torch.cat([y, labels]), init, differentiable=True)
        return objective(short, params, x_val, y_val, options)

    (gradient,) = torch.autograd.grad(value(poison), poison)
    for index in [(0, 0, 1, 2), (1, 0, 3, 0)]:
        step = torch.zeros_like(poison)
        step[index] = 1e-5
        with torch.no_grad():
            numeric = (value(poison + step) - value(poison - step)) / 2e-5
        assert float(gradient[index]) == pytest.approx(float(numeric), rel=1e-4, abs=1e-9)


@pytest.mark.parametrize("goal", ["generic", "specific"])
def test_crafted_points_beat_their_label_flip_start_on_a_victim_of_another_initialisation(digits, goal):
    (x, y), (x_val, y_val), (x_test, y_test) = digits
    options = BackGradientOptions(learner="mlp", goal=goal, iterations=15)
    points = craft_back_gradient(x, y, x_val, y_val, 36, 10, options)
    assert points.images.dtype == torch.uint8 and points.images.shape == (36, 1, 8, 8)
    assert min(points.history) < points.history[0]
    if goal == "specific":
        assert (points.labels == options.destination).all()
    learner = get_learner("mlp")
    init = learner.init((1, 8, 8), 10, torch.Generator().manual_seed(99))

    def harm(added):
        params = train(learner, torch.cat([x, added.float() / 255]), torch.cat([y, points.labels]), init)
        predicted = torch.from_numpy(predict(learner, params, x_test))
        if goal == "generic":
            return float((predicted != y_test).float().mean())
        return float((predicted[y_test == options.source] == options.destination).float().mean())

    assert harm(points.images) > harm(points.start_images) + 0.01


def test_crafting_refuses_what_it_cannot_do(digits):
    (x, y), (x_val, y_val), _ = digits
    with pytest.raises(SanitizeError, match="goal"):
        craft_back_gradient(x, y, x_val, y_val, 3, 10, BackGradientOptions(goal="both"))
    with pytest.raises(SanitizeError, match="learner"):
        craft_back_gradient(x, y, x_val, y_val, 3, 10, BackGradientOptions(learner="svm"))
    with pytest.raises(SanitizeError, match="source"):
        craft_back_gradient(x, y, x_val, y_val, 3, 10, BackGradientOptions(goal="specific", source=12))


def test_the_evaluation_writes_every_arm_scores_the_scan_and_a_rerun_resumes(tmp_path):
    config = BackGradientConfig(
        BackGradientOptions(iterations=20),
        fractions=(0.05,),
        seeds=(0,),
        arms=("clean", "label-flip", "undefended", "scan"),
        train_size=300,
        validation_size=300,
    )
    run_back_gradient_evaluation(None, tmp_path, config)
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    by_arm = {r["arm"]: r for r in rows}
    assert set(by_arm) == {"clean", "label-flip", "undefended", "scan"} and by_arm["scan"]["poisons"] == 15
    assert by_arm["undefended"]["test_error"] > by_arm["clean"]["test_error"]
    assert by_arm["scan"]["auroc"] > 0.5 and 0 < by_arm["scan"]["dropped_fraction"] < 0.5
    assert "| logistic | generic | 5% (15) | scan | 1 |" in (tmp_path / "summary.md").read_text()
    run_back_gradient_evaluation(None, tmp_path, config)
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 4
    # another threshold is another variant of the scan arm: one more row, the rest resumed
    run_back_gradient_evaluation(None, tmp_path, dataclasses.replace(config, scan_threshold=0.3))
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and rows[-1]["arm"] == "scan" and rows[-1]["scan_threshold"] == 0.3
    assert rows[-1]["dropped_fraction"] > by_arm["scan"]["dropped_fraction"]
    assert "| scan (threshold 0.3) |" in (tmp_path / "summary.md").read_text()
    run_back_gradient_evaluation(None, tmp_path, dataclasses.replace(config, scan_epochs=2))  # another proxy
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and rows[-1]["scan_epochs"] == 2 and rows[-1]["scan_options"]["proxy_epochs"] == 2
    assert "| scan (proxy 2 epochs) |" in (tmp_path / "summary.md").read_text()
    # weights trained on the trusted validation split, held out, with the disagree rule: a variant of its own whose
    # label check flags what those weights call another class
    trusted = dataclasses.replace(config, scan_trusted=True, scan_label_rule="disagree")
    run_back_gradient_evaluation(None, tmp_path, trusted)
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 7 and rows[-1]["scan_trusted"] and rows[-1]["scan_options"]["held_out_checkpoint"]
    assert rows[-1]["scan_options"]["label_rule"] == "disagree" and rows[-1]["poison_recall"] > 0
    assert list((tmp_path / "cache" / "trusted").glob("*/model.pt"))
    assert "| scan (trusted proxy, held out, label rule disagree) |" in (tmp_path / "summary.md").read_text()
    run_back_gradient_evaluation(None, tmp_path, trusted)
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 7


def test_victims_of_another_learner_are_rows_of_their_own(tmp_path):
    """The paper's transfer: points crafted against logistic regression, victims an MLP; the same poisons."""
    config = BackGradientConfig(
        BackGradientOptions(iterations=5),
        fractions=(0.05,),
        seeds=(0,),
        arms=("undefended",),
        train_size=200,
        validation_size=200,
    )
    run_back_gradient_evaluation(None, tmp_path, config)
    run_back_gradient_evaluation(None, tmp_path, dataclasses.replace(config, victim_learner="mlp"))
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["victim_learner"] for r in rows] == ["logistic", "mlp"]
    assert rows[0]["attacker_objective"] == rows[1]["attacker_objective"]  # crafted once, cached
    assert "| logistic -> mlp | generic | 5% (10) | undefended | 1 |" in (tmp_path / "summary.md").read_text()


@pytest.mark.parametrize(
    "arguments",
    [["--fractions", "0.03,lots"], ["--fractions", "1.5"], ["--arms", "clean,prayer"], ["--seeds", "x"]],
)
def test_the_command_refuses_bad_options_in_one_line(tmp_path, arguments):
    result = CliRunner().invoke(cli, ["evaluate-back-gradient", "--out", str(tmp_path / "out"), *arguments])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) <= 3


@pytest.mark.parametrize("folder", ["back-gradient", "back-gradient/tuning"])
def test_the_committed_tables_are_reproduced_from_their_rows(tmp_path, folder):
    committed = Path(__file__).resolve().parents[2] / "reports" / folder
    if not (committed / "results.jsonl").exists():
        pytest.skip("not committed")
    shutil.copy(committed / "results.jsonl", tmp_path / "results.jsonl")
    write_summary(tmp_path, BackGradientConfig(), None)

    def table(path):
        return [line for line in path.read_text().splitlines() if line.startswith("|")]

    assert table(tmp_path / "summary.md") == table(committed / "summary.md")
