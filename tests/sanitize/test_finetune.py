"""`sanitize finetune`: linear fine-tuning changes the head only, end-to-end every weight; robust fine-tuning drops
isolated examples in the first quarter and logs them; bad input is a one-line error."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from sanitize import finetune, train
from sanitize.cli import cli
from sanitize.data import open_dataset
from sanitize.finetuner import FineTune, fine_tune, robust_dropper
from sanitize.models import create_model, load_weights

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, digits_npz):
    """A tiny network trained for 2 epochs on the digits: the checkpoint fine-tuned here."""
    out = tmp_path_factory.mktemp("pretrained")
    train(digits_npz, out, model="tiny", epochs=2, quiet=True)
    return out / "model.pt"


def _model(checkpoint):
    model = create_model("tiny", 10, (3, 16, 16))
    load_weights(model, checkpoint)
    return model


@pytest.mark.parametrize("mode", ["linear", "end-to-end"])
def test_linear_changes_the_head_only_end_to_end_everything_and_a_seed_repeats(mode, pretrained, digits_npz):
    data = open_dataset(digits_npz, progress=False).subset(np.arange(200))
    start = _model(pretrained)
    recipe = FineTune(mode, epochs=3, lr=1e-2)
    tuned, again = (fine_tune(start, data, recipe, 0, CPU, None) for _ in range(2))
    body_moved = any(not torch.equal(a, b) for a, b in zip(tuned.body.parameters(), start.body.parameters()))
    assert body_moved == (mode == "end-to-end")
    assert not torch.equal(tuned.head.weight, start.head.weight)
    assert torch.equal(tuned.head.weight, again.head.weight)


def test_each_epoch_trains_on_the_positions_the_hook_returned(pretrained, digits_npz):
    data = open_dataset(digits_npz, progress=False).subset(np.arange(100))
    start, seen = _model(pretrained), []

    def drop_ten(epoch, model, positions):
        seen.append((epoch, len(positions), model.training))
        return positions[10:]

    fine_tune(start, data, FineTune("linear", epochs=3, lr=1e-2), 0, CPU, None, drop_ten)
    assert seen == [(0, 100, False), (1, 90, False), (2, 80, False)]
    everything = fine_tune(start, data, FineTune("linear", epochs=3, lr=1e-2), 0, CPU, None, lambda e, m, p: p)
    plain = fine_tune(start, data, FineTune("linear", epochs=3, lr=1e-2), 0, CPU, None)
    assert torch.equal(everything.head.weight, plain.head.weight)  # a hook that drops nothing changes nothing


def test_robust_rounds_leave_the_network_in_eval_mode(tmp_path, pretrained, mislabeled_npz):
    """Fine-tuning keeps batch norm frozen: a round predicts in eval mode and hands the model back as it found it."""
    data = open_dataset(mislabeled_npz[0], progress=False)
    recipe = FineTune("end-to-end", epochs=8, lr=1e-3)
    dropper, modes = robust_dropper(data, recipe, tmp_path / "drop_log.json", CPU, None), []

    def round_then_mode(epoch, model, positions):
        survivors = dropper(epoch, model, positions)
        modes.append(model.training)
        return survivors

    fine_tune(_model(pretrained), data, recipe, 0, CPU, None, round_then_mode)
    assert dropper.rounds == [1] and len(dropper.dropped()) > 0 and modes == [False] * 8


def test_robust_fine_tuning_on_what_a_scan_kept_logs_its_drops_and_writes_a_loadable_model(
    tmp_path, pretrained, mislabeled_npz
):
    data, _ = mislabeled_npz
    ids = open_dataset(data, progress=False).ids
    (tmp_path / "flagged.txt").write_text("".join(f"{i}\n" for i in ids[:30]))
    result = CliRunner().invoke(
        cli,
        ["finetune", str(data), "--checkpoint", str(pretrained), "--model", "tiny", "--robust", "--epochs", "8"]
        + ["--exclude", str(tmp_path / "flagged.txt"), "--out", str(tmp_path / "out"), "--quiet"],
    )
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    log, summary = json.loads((out / "drop_log.json").read_text()), json.loads((out / "summary.json").read_text())
    assert log["rounds"] == [1] and summary["robust"]["rounds"] == [1]  # epochs 1 to ceil(8 / 4) - 1
    dropped = {row["id"] for row in log["dropped"]}
    kept = set((out / "kept.txt").read_text().split())
    assert 0 < len(dropped) <= log["cap"] == 97  # 10% of the 970 left after the 30 excluded
    assert not dropped & kept and len(dropped | kept) == 970 and not kept & set(ids[:30])
    assert summary["kind"] == "robust-finetune" and summary["excluded"]["examples"] == 30
    assert create_model("tiny", 10, (3, 16, 16)).load_state_dict(torch.load(out / "model.pt", weights_only=True))
    assert "dropped" in result.output


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--model", "convnet"], "does not fit the model"),  # weights of another architecture
        (["--model", "tiny", "--epochs", "0"], "epochs and batch_size must be >= 1"),
    ],
)
def test_bad_options_are_a_one_line_error_and_leave_no_output(tmp_path, pretrained, digits_npz, options, message):
    result = CliRunner().invoke(
        cli,
        ["finetune", str(digits_npz), "--checkpoint", str(pretrained), "--out", str(tmp_path / "out"), *options],
    )
    assert result.exit_code == 2 and message in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_the_python_api_takes_the_commands_options(tmp_path, pretrained, digits_npz):
    result = finetune(digits_npz, tmp_path / "out", checkpoint=str(pretrained), model="tiny", epochs=1, quiet=True)
    assert result.summary["kind"] == "finetune" and result.summary["robust"] is None
    assert (tmp_path / "out" / "model.pt").exists() and not (tmp_path / "out" / "drop_log.json").exists()
