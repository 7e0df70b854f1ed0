"""Which poisons does the cpu-scale attack need? Victims trained with only some of the crafted poisons left.

A detector need not catch every poison if the ones it misses cannot flip the target on their own. Three ways to
choose the poisons that stay (the others are reverted to their clean images):
- `random`: a random `fraction` of them, what a detector whose catches are unrelated to effectiveness leaves;
- `carriers`: only the carriers, the fewest poisons holding half of the total pull on the target (each poison's
  gradient on the clean surrogate projected on the target's adversarial gradient: attacks.gradient_matching);
- `rest`: every poison but the carriers.

    python benchmarks/poison_dose.py --cache work-data/cache-cpu --keys 0 --keep carriers,rest,random:0.5 --victims 2 \
        --out reports/gradient-matching-cpu-ablations/poison-dose

Appends one JSON line per victim to OUT/dose.jsonl (resumable) and rewrites OUT/dose.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from attacks import choose_setup
from attacks.base import PoisonSet
from attacks.carriers import poison_pull, pull_carriers
from attacks.experiment import Harness
from attacks.scales import EvaluationConfig


def kept_mask(choice: str, poisons: PoisonSet, harness: Harness) -> np.ndarray:
    """Which poisons stay under `choice` (random:FRACTION, carriers or rest)."""
    count = len(poisons.deltas)
    if choice.startswith("random:"):
        keep = np.zeros(count, bool)
        keep[
            np.random.default_rng([poisons.setup.key, 7]).permutation(count)[
                : round(float(choice.split(":")[1]) * count)
            ]
        ] = True
        return keep
    (surrogate, *_), _ = harness.surrogates()
    positions = np.asarray(poisons.setup.poison_indices)
    clean = torch.from_numpy(harness.train.images[positions]).permute(0, 3, 1, 2)
    labels = torch.from_numpy(harness.train.labels[positions])
    carriers = pull_carriers(
        poison_pull(
            surrogate,
            poisons.apply(clean),
            labels,
            harness.test.load_image(poisons.setup.target_index),
            poisons.setup.intended_class,
        )
    )
    if choice == "carriers":
        return carriers
    if choice == "rest":
        return ~carriers
    raise SystemExit(f"unknown --keep choice {choice!r}: random:FRACTION, carriers or rest")


def thinned(poisons: PoisonSet, keep: np.ndarray) -> PoisonSet:
    """The same poisons with those outside `keep` reverted to clean (deltas zeroed)."""
    deltas = poisons.deltas.clone()
    deltas[torch.from_numpy(~keep)] = 0
    return PoisonSet(poisons.setup, poisons.eps, deltas, poisons.method, poisons.metadata)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=Path("../shared"))
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--keys", default="0")
    parser.add_argument("--keep", default="carriers,rest")
    parser.add_argument("--victims", type=int, default=2)
    parser.add_argument("--eps", type=float, default=16.0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    data = args.shared / "data" / "cifar10"
    config = EvaluationConfig(scale="cpu", eps=args.eps, cache=str(args.cache))
    harness = Harness(data / "cifar10_train.npz", data / "cifar10_test.npz", args.cache, config, progress=False)
    args.out.mkdir(parents=True, exist_ok=True)
    rows_path = args.out / "dose.jsonl"
    done = (
        {(r["poison_key"], r["keep"], r["victim_seed"]) for r in map(json.loads, rows_path.read_text().splitlines())}
        if rows_path.exists()
        else set()
    )
    for key in (int(k) for k in args.keys.split(",")):
        setup = choose_setup(key, harness.train, harness.test, config.budget)
        if not harness.poisons_path(setup).exists():
            print(f"key {key}: no cached poisons, skipped")
            continue
        poisons = harness.poisons(setup, None)
        for choice in args.keep.split(","):
            keep = kept_mask(choice, poisons, harness)
            data = harness.data_for("undefended", thinned(poisons, keep))
            for seed in range(args.victims):
                if (key, choice, seed) in done:
                    continue
                model, cost = harness.models.trained(data, seed, "victim-dose")
                measured = harness.measure(model, setup)
                row = {
                    "poison_key": key,
                    "eps": args.eps,
                    "keep": choice,
                    "poisons_left": int(keep.sum()),
                    "victim_seed": seed,
                    "success": measured["target_pred"] == setup.intended_class,
                    **measured,
                    "model": harness.scale.model,
                    "epochs": harness.recipe.epochs,
                    "victim_seconds": round(cost.wall, 1),
                }
                with rows_path.open("a") as handle:
                    handle.write(json.dumps(row) + "\n")
                print(json.dumps(row), flush=True)
    render(rows_path, args.out / "dose.md", " ".join(sys.argv))


def render(rows_path: Path, out: Path, command: str) -> None:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in map(json.loads, rows_path.read_text().splitlines()):
        groups[(r["poison_key"], r["eps"], r["keep"])].append(r)
    lines = [
        f"Command: `python {command}`",
        "",
        "| key | eps | kept | poisons left | victims | flipped | p(intended) | clean acc |",
        "|" + " --- |" * 8,
    ]
    for (key, eps, choice), rows in sorted(groups.items()):
        p_intended = ", ".join(f"{r['p_intended']:.2f}" for r in rows)
        lines.append(
            f"| {key} | {eps:g} | {choice} | {rows[0]['poisons_left']} | {len(rows)} | {sum(r['success'] for r in rows)} | "
            f"{p_intended} | {np.mean([r['clean_acc'] for r in rows]):.1%} |"
        )
    out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
