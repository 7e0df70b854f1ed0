"""What MetaPoison costs per key at the `full` scale, from its measured parts, beside gradient matching in one run.

A MetaPoison craft step unrolls every poison once per member (batches of `batch_size` poisons filled to `clean_batch`
with clean images, K SGD steps differentiated through) and then trains every member on `advance_epochs` of data; before
the first step the members are staggered over `span_epochs`. All three parts are timed here on the full scale's model
(ResNet-18 of width 16, CIFAR-10, all 50,000 images, 500 poisons), single-threaded in CPU seconds, together with one gradient-matching
iteration on the same poisons (its craft is restarts x iterations of those), and the per-key cost is projected for
several ensemble sizes. What the weights are does not change the cost, so the models are freshly initialised.

    OMP_NUM_THREADS=1 python benchmarks/metapoison_cost.py --shared ../shared --out reports/metapoison-pilot/cost

Writes OUT/cost.json and OUT/cost.md.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from attacks import attack_options, choose_setup
from attacks.registry import get_attack
from attacks.scales import SCALES, EvaluationConfig
from attacks.summary import git_commit
from sanitize.data import open_dataset
from sanitize.models import create_model
from sanitize.training import channel_stats

CPU = torch.device("cpu")


def seconds_per_call(call, repeats: int) -> float:
    """Mean CPU seconds of `call()` over `repeats`, after one untimed warm-up call: this process's CPU time, so that
    other jobs on the machine do not inflate it (the projection is in CPU-hours)."""
    call()
    started = time.process_time()
    for _ in range(repeats):
        call()
    return (time.process_time() - started) / repeats


def measure(shared: Path, key: int, repeats: int) -> dict:
    scale = SCALES["full"]
    data = shared / "data" / "cifar10"
    train = open_dataset(data / "cifar10_train.npz", progress=False)
    test = open_dataset(data / "cifar10_test.npz", progress=False)
    setup = choose_setup(key, train, test, budget=EvaluationConfig().budget)
    torch.manual_seed(0)
    model = create_model(scale.model, train.num_classes, (3, *train.image_size), **scale.model_kwargs)
    model.set_normalization(*channel_stats(train))
    target = test.load_image(setup.target_index)
    images, labels, _ = train.load_batch(np.asarray(setup.poison_indices))
    poisons = images.float().div(255)
    generator = torch.Generator().manual_seed(0)

    def loss_and_backward(attack, batch: slice):
        x = poisons[batch].clone().requires_grad_(True)
        attack.loss(x, labels[batch], generator).backward()

    matching_options = EvaluationConfig(scale="full").resolved()[2]
    model.eval()
    matching = get_attack("gradient-matching")(matching_options, [model], target, setup, CPU, None, train)
    matching_iteration = seconds_per_call(lambda: loss_and_backward(matching, slice(None)), repeats)

    options = attack_options("metapoison", ensemble=1)  # member 0 starts at step 0: nothing to stagger here
    metapoison = get_attack("metapoison")(options, [model], target, setup, CPU, None, train)
    unroll = seconds_per_call(lambda: loss_and_backward(metapoison, slice(0, options.batch_size)), repeats)
    train_step = seconds_per_call(lambda: metapoison._train(0, 1), repeats * 4)
    steps_per_epoch = len(train) // options.clean_batch
    return {
        "key": key,
        "poisons": len(setup.poison_indices),
        "model": scale.model,
        "threads": torch.get_num_threads(),
        "gradient_matching": {
            "iteration_seconds": round(matching_iteration, 3),
            "iterations": matching_options.iterations,
            "restarts": matching_options.restarts,
        },
        "metapoison": {
            "unroll_seconds": round(unroll, 3),
            "train_step_seconds": round(train_step, 3),
            "unrolls_per_member_step": math.ceil(len(setup.poison_indices) / options.batch_size),
            "advance_steps": max(1, round(options.advance_epochs * steps_per_epoch)),
            "span_steps": round(options.span_epochs * steps_per_epoch),
            "iterations": options.iterations,
            "options": {
                k: getattr(options, k)
                for k in ("batch_size", "clean_batch", "unroll", "span_epochs", "advance_epochs", "target_norm")
            },
        },
        "commit": (git_commit() or "")[:7],
    }


def projection(row: dict, ensemble: int) -> dict:
    """CPU-hours per key for an ensemble of `ensemble` members: staggering, then every craft step's unrolls and
    advances."""
    mp = row["metapoison"]
    per_member_step = (
        mp["unrolls_per_member_step"] * mp["unroll_seconds"] + mp["advance_steps"] * mp["train_step_seconds"]
    )
    stagger = mp["span_steps"] * (ensemble - 1) / 2 * mp["train_step_seconds"]
    step = ensemble * per_member_step
    return {
        "ensemble": ensemble,
        "stagger_hours": stagger / 3600,
        "step_seconds": step,
        "unroll_share": ensemble * mp["unrolls_per_member_step"] * mp["unroll_seconds"] / step,
        "key_hours": (stagger + mp["iterations"] * step) / 3600,
    }


def write_table(row: dict, out: Path) -> None:
    gm, mp = row["gradient_matching"], row["metapoison"]
    gm_hours = gm["iteration_seconds"] * gm["iterations"] * gm["restarts"] / 3600
    lines = [
        f"Measured at commit {row['commit']} on key {row['key']} ({row['poisons']} poisons, `{row['model']}`, "
        f"{row['threads']} thread): one gradient-matching iteration {gm['iteration_seconds']} s; one MetaPoison unroll "
        f"of {mp['options']['batch_size']} poisons in a batch of {mp['options']['clean_batch']} (K = "
        f"{mp['options']['unroll']}, its meta-gradient included) {mp['unroll_seconds']} s; one member's SGD step "
        f"{mp['train_step_seconds']} s.",
        "",
        "| attack | per craft step (s) | of it unrolling | staggering (CPU-h) | per key (CPU-h) | vs gradient matching |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| gradient matching, {gm['restarts']} x {gm['iterations']} steps | {gm['iteration_seconds']:.1f} | - | - "
        f"| {gm_hours:.2f} | 1.0x |",
    ]
    for ensemble in (6, 12, 24):
        p = projection(row, ensemble)
        lines.append(
            f"| MetaPoison, M = {ensemble}, {mp['iterations']} steps | {p['step_seconds']:.0f} | {p['unroll_share']:.0%} "
            f"| {p['stagger_hours']:.2f} | {p['key_hours']:.2f} | {p['key_hours'] / gm_hours:.1f}x |"
        )
    (out / "cost.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shared", type=Path, default=Path("../shared"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--key", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    row = measure(args.shared, args.key, args.repeats)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cost.json").write_text(json.dumps(row, indent=2) + "\n")
    write_table(row, args.out)
    print((args.out / "cost.md").read_text())


if __name__ == "__main__":
    main()
