"""Dose-response of the cpu-scale attack: victims trained with only a random share of the crafted poisons left.

A detector need not catch every poison if the ones it misses cannot flip the target on their own. This measures how
success and p(intended) fall as poisons are reverted to their clean images at random, which is what a detector of
a given recall does to an attack when its catches are unrelated to effectiveness.

    python benchmarks/poison_dose.py --cache work-data/cache-cpu --keys 0 --fractions 0.5,0.25 --victims 2 \
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

from attacks import choose_setup
from attacks.base import PoisonSet
from attacks.evaluate import EvaluationConfig, Harness


def thinned(poisons: PoisonSet, fraction: float) -> PoisonSet:
    """The same poisons with all but a random `fraction` of them reverted to clean (deltas zeroed); seeded by key."""
    count = len(poisons.deltas)
    keep = np.random.default_rng([poisons.setup.key, 7]).permutation(count)[: round(fraction * count)]
    deltas = poisons.deltas.clone()
    mask = np.ones(count, bool)
    mask[keep] = False
    deltas[mask] = 0
    return PoisonSet(poisons.setup, poisons.eps, deltas, poisons.method, poisons.metadata)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=Path("../shared"))
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--keys", default="0")
    parser.add_argument("--fractions", default="0.5,0.25")
    parser.add_argument("--victims", type=int, default=2)
    parser.add_argument("--eps", type=float, default=16.0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    data = args.shared / "data" / "cifar10"
    config = EvaluationConfig(scale="cpu", eps=args.eps, cache=str(args.cache))
    harness = Harness(data / "cifar10_train.npz", data / "cifar10_test.npz", args.cache, config, progress=False)
    args.out.mkdir(parents=True, exist_ok=True)
    rows_path = args.out / "dose.jsonl"
    done = {(r["poison_key"], r["fraction"], r["victim_seed"]) for r in map(json.loads, rows_path.read_text().splitlines())} if rows_path.exists() else set()
    for key in (int(k) for k in args.keys.split(",")):
        setup = choose_setup(key, harness.train, harness.test, config.budget)
        if not harness.poisons_path(setup).exists():
            print(f"key {key}: no cached poisons, skipped")
            continue
        poisons = harness.poisons(setup, None)
        for fraction in (float(f) for f in args.fractions.split(",")):
            data = harness.data_for("undefended", thinned(poisons, fraction))
            for seed in range(args.victims):
                if (key, fraction, seed) in done:
                    continue
                model, seconds = harness.trained(data, seed, "victim-dose")
                measured = harness.measure(model, setup)
                row = {"poison_key": key, "eps": args.eps, "fraction": fraction, "poisons_left": round(fraction * len(poisons.deltas)),
                       "victim_seed": seed, "success": measured["target_pred"] == setup.intended_class, **measured,
                       "model": harness.scale.model, "epochs": harness.recipe.epochs, "victim_seconds": round(seconds, 1)}
                with rows_path.open("a") as handle:
                    handle.write(json.dumps(row) + "\n")
                print(json.dumps(row), flush=True)
    render(rows_path, args.out / "dose.md", " ".join(sys.argv))


def render(rows_path: Path, out: Path, command: str) -> None:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in map(json.loads, rows_path.read_text().splitlines()):
        groups[(r["poison_key"], r["eps"], r["fraction"])].append(r)
    lines = [f"Command: `python {command}`", "", "| key | eps | poisons left | victims | flipped | p(intended) | clean acc |", "|" + " --- |" * 7]
    for (key, eps, fraction), rows in sorted(groups.items()):
        p_intended = ", ".join(f"{r['p_intended']:.2f}" for r in rows)
        lines.append(f"| {key} | {eps:g} | {rows[0]['poisons_left']} ({fraction:.0%}) | {len(rows)} | {sum(r['success'] for r in rows)} | "
                     f"{p_intended} | {np.mean([r['clean_acc'] for r in rows]):.1%} |")
    out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
