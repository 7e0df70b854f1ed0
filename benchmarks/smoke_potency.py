"""Does an attack's variant move a tiny victim at the smoke scale, and how far beyond random noise? (attacks.smoke)

Crafts against a tiny surrogate on 1,500 digits (16 px), then trains tiny victims from scratch on the crafted poisons
and on random +-eps noise at the same positions; the row is the target's mean logit margin (intended - true) for both
and their gap. The cheap first check of an attack's options before it costs CPU-hours at a real scale.

    python benchmarks/smoke_potency.py --attack metapoison --out reports/metapoison-pilot/smoke \
        iterations=30 ensemble=3 clean_batch=64 augment=false span_epochs=8 advance_epochs=1

Appends one JSON line per run to OUT/smoke.jsonl and rewrites OUT/smoke.md. With --scan, the default `sanitize scan`
also judges the poisoned set (verdict, recall of the poisons, AUROC): the adaptive attacker's first check.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from attacks import attack_options, choose_setup, craft
from attacks.arms import poison_truth
from attacks.experiment import arm_data
from attacks.registry import parse_option
from attacks.smoke import CPU, digits_split, margins_against_noise, train_tiny
from attacks.summary import git_commit
from sanitize.manifest import flag_metrics
from sanitize.scanner import scan


def run(attack: str, options: dict, key: int, eps: int, budget: float, victims: int, scan_dir: Path | None) -> dict:
    train, test = digits_split()
    surrogate = train_tiny(train, 100)
    setup = choose_setup(key, train, test, budget=budget)
    config = attack_options(attack, **options)
    started = time.perf_counter()
    target = test.load_image(setup.target_index)
    poisons = craft(attack, [surrogate], train, target, setup, eps, config, device=CPU, progress=False)
    seconds = time.perf_counter() - started
    margins = margins_against_noise(train, test, setup, poisons, eps, seeds=tuple(range(victims)))
    detection = scanned(train, setup, poisons, scan_dir) if scan_dir is not None else {}
    history = poisons.metadata["loss_history_best"]
    return {
        "attack": attack,
        "options": options,
        "key": key,
        "eps": eps,
        "budget": budget,
        "victims": victims,
        "craft_seconds": round(seconds, 1),
        "margin_crafted": round(margins["crafted"], 3),
        "margin_random": round(margins["random"], 3),
        "gap": round(margins["crafted"] - margins["random"], 3),
        "loss_first_last": [round(history[0], 4), round(history[-1], 4)],
        "commit": (git_commit() or "")[:7],
        **detection,
    }


def scanned(train, setup, poisons, out: Path) -> dict:
    """What the default `sanitize scan` makes of the poisoned set: its verdict, the flags' precision and recall and the
    scores' AUROC against the true poisons."""
    result = scan(arm_data(train, "undefended", poisons, setup, poisons.eps), out, quiet=True, device="cpu")
    metrics = flag_metrics(result.flags, result.scores, poison_truth(setup, len(train)))
    return {"scan_verdict": result.summary["gate"]["verdict"], **{f"scan_{k}": v for k, v in metrics.items()}}


def write_table(out: Path) -> None:
    rows = [json.loads(line) for line in (out / "smoke.jsonl").read_text().splitlines() if line.strip()]
    lines = [
        "| attack | options | key | eps | budget | craft s | margin crafted | margin random | gap | loss first -> last "
        "| scan verdict | scan recall | scan AUROC |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        options = " ".join(f"{k}={v}" for k, v in r["options"].items())
        first, last = r["loss_first_last"]
        lines.append(
            f"| {r['attack']} | {options} | {r['key']} | {r['eps']} | {r['budget']:g} | {r['craft_seconds']} | {r['margin_crafted']} "
            f"| {r['margin_random']} | **{r['gap']}** | {first} -> {last} "
            f"| {r.get('scan_verdict', '-')} | {_cell(r.get('scan_poison_recall'))} | {_cell(r.get('scan_auroc'))} |"
        )
    (out / "smoke.md").write_text("\n".join(lines) + "\n")


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--attack", default="metapoison")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--key", type=int, default=1)
    parser.add_argument("--eps", type=int, default=32)
    parser.add_argument("--budget", type=float, default=0.1)
    parser.add_argument("--victims", type=int, default=2)
    parser.add_argument("--scan", action="store_true", help="also scan the poisoned set (default options)")
    parser.add_argument("options", nargs="*", help="NAME=VALUE: the attack's own options")
    args = parser.parse_args()
    torch.set_num_threads(1)
    options = dict(parse_option(args.attack, text) for text in args.options)
    scan_dir = Path(tempfile.mkdtemp()) / "scan" if args.scan else None
    row = run(args.attack, options, args.key, args.eps, args.budget, args.victims, scan_dir)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "smoke.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    write_table(args.out)
    print(json.dumps(row))


if __name__ == "__main__":
    sys.exit(main())
