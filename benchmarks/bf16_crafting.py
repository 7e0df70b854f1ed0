"""Does crafting in bf16 poison as well as crafting in fp32? docs/protocol.md asks for this check once, on a small setup.

    python benchmarks/bf16_crafting.py --keys 0-9 --victims 2 --out reports/bf16-crafting

The setup is the test suite's small problem, where crafted poisons measurably move retrained models: scikit-learn's
digits at 16 px (1,500 train / 297 test), the `tiny` net, 8 epochs without augmentation, budget 10%, eps 32,
60 iterations x 2 restarts. For every key the same surrogate crafts twice, with bf16 autocast and in fp32; victims
(the same seeds, trained in fp32 for both) learn each poisoned set; we compare success and the target's margin
logit(intended) - logit(true class). Rows go to OUT/rows.jsonl, the comparison to OUT/README.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from attacks import attack_options, choose_setup, craft
from sanitize.cli import parse_keys
from sanitize.config import TrainConfig
from sanitize.data.arrays import ArrayDataset, from_arrays
from sanitize.data.digits import digits_arrays
from sanitize.errors import SanitizeError
from sanitize.models import Classifier, create_model
from sanitize.training import channel_stats, predict, train_model

CPU = torch.device("cpu")
RECIPE = TrainConfig(epochs=8, batch_size=64, augment=False)
EPS, BUDGET = 32, 0.1
SURROGATE_SEED = 100


def split() -> tuple[ArrayDataset, ArrayDataset]:
    x, y = digits_arrays(size=16)
    order = np.random.default_rng(0).permutation(len(x))
    classes = [str(c) for c in range(10)]
    return from_arrays(x[order[:1500]], y[order[:1500]], classes, "digits"), from_arrays(
        x[order[1500:]], y[order[1500:]], classes, "digits-test"
    )


def trained(data: ArrayDataset, seed: int) -> Classifier:
    torch.manual_seed(seed)
    model = create_model("tiny", 10, (3, 16, 16), width=32)
    model.set_normalization(*channel_stats(data))
    train_model(
        model, data, np.arange(len(data)), TrainConfig(**{**RECIPE.__dict__, "seed": seed}), CPU, None, progress=False
    )
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", default="0-7")
    parser.add_argument("--victims", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows_path = args.out / "rows.jsonl"
    done = (
        {(r["key"], r["precision"], r["victim_seed"]) for r in map(json.loads, rows_path.read_text().splitlines())}
        if rows_path.exists()
        else set()
    )
    train, test = split()
    surrogate = trained(train, SURROGATE_SEED)
    clean_victims = {}  # the same seeds on unpoisoned data: how far crafting moved the margin at all
    for key in parse_keys(args.keys):
        try:
            setup = choose_setup(key, train, test, BUDGET)
        except SanitizeError as error:  # a budget of 10% needs an intended class of 150 digits; some have 149
            print(f"key {key} skipped: {error}", flush=True)
            continue
        positions = np.asarray(setup.poison_indices)
        clean = torch.from_numpy(train.images[positions]).permute(0, 3, 1, 2)
        for seed in range(args.victims):
            if (key, "none", seed) in done:
                continue
            model = clean_victims.setdefault(seed, trained(train, seed))
            logits = predict(model, test, np.array([setup.target_index]), CPU, None)[0]
            row = {
                "key": key,
                "precision": "none",
                "victim_seed": seed,
                "success": int(logits.argmax()) == setup.intended_class,
                "margin": float(logits[setup.intended_class] - logits[setup.target_class]),
                "craft_final_loss": None,
                "craft_seconds": None,
            }
            with rows_path.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
        for precision, amp in (("bf16", torch.bfloat16), ("fp32", None)):
            if all((key, precision, v) in done for v in range(args.victims)):
                continue
            config = attack_options(
                "gradient-matching", iterations=60, restarts=2, batch_size=64, augment=False, seed=0
            )
            started = time.perf_counter()
            poisons = craft(
                "gradient-matching",
                [surrogate],
                train,
                test.load_image(setup.target_index),
                setup,
                EPS,
                config,
                device=CPU,
                amp_dtype=amp,
                progress=False,
            )
            seconds = time.perf_counter() - started
            images = train.images.copy()
            images[positions] = poisons.apply(clean).permute(0, 2, 3, 1).numpy()
            for seed in range(args.victims):
                logits = predict(
                    trained(train.with_images(images), seed), test, np.array([setup.target_index]), CPU, None
                )[0]
                row = {
                    "key": key,
                    "precision": precision,
                    "victim_seed": seed,
                    "success": int(logits.argmax()) == setup.intended_class,
                    "margin": float(logits[setup.intended_class] - logits[setup.target_class]),
                    "craft_final_loss": min(poisons.metadata["final_loss_per_restart"]),
                    "craft_seconds": round(seconds, 1),
                }
                with rows_path.open("a") as handle:
                    handle.write(json.dumps(row) + "\n")
                print(json.dumps(row), flush=True)
    rows = [json.loads(line) for line in rows_path.read_text().splitlines()]
    lines = [
        "# bf16 against fp32 crafting, on the test suite's small problem",
        "",
        f"Command: `python {' '.join(sys.argv)}`",
        "",
        __doc__.split("\n\n")[2].replace("\n", " "),
        "",
        "| crafting | victims (keys) | success | mean margin | mean final alignment loss | craft s per key |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for precision in ("bf16", "fp32", "none"):
        mine = [r for r in rows if r["precision"] == precision]
        crafted = precision != "none"
        loss = f"{np.mean([r['craft_final_loss'] for r in mine]):.3f}" if crafted else "-"
        seconds = f"{np.mean([r['craft_seconds'] for r in mine]):.1f}" if crafted else "-"
        lines.append(
            f"| {precision if crafted else 'none (clean victims)'} | {len(mine)} ({len({r['key'] for r in mine})}) "
            f"| {np.mean([r['success'] for r in mine]):.0%} | {np.mean([r['margin'] for r in mine]):+.2f} | {loss} | {seconds} |"
        )
    paired = {}
    for r in rows:
        paired.setdefault((r["key"], r["victim_seed"]), {})[r["precision"]] = r["margin"]
    differences = [m["bf16"] - m["fp32"] for m in paired.values() if {"bf16", "fp32"} <= set(m)]
    if len(differences) > 1:
        lines += [
            "",
            f"Paired margin difference bf16 - fp32 over {len(differences)} (key, victim) pairs: {np.mean(differences):+.2f} "
            f"+- {np.std(differences, ddof=1) / np.sqrt(len(differences)):.2f} (SE); crafting itself moved it by "
            + " and ".join(
                f"{np.mean([m[p] - m['none'] for m in paired.values() if {p, 'none'} <= set(m)]):+.2f} ({p})"
                for p in ("bf16", "fp32")
            )
            + " over the clean victims. No target flips on this problem at either precision, so the margin is the measure.",
        ]
    (args.out / "README.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
