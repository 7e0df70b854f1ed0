"""Benchmark of gradient-matching crafting: our implementation against ART's `GradientMatchingAttack`.

Same surrogate (the evaluation's cached one), same target, same poison images, same eps, same number of iterations;
one restart each. Reports seconds per iteration and poison images per second (poisons x iterations / seconds), for
ours in fp32 and bf16, with and without the differentiable augmentation (ART has none), and ART in fp32. Also
collects the measured phases of whole trials from an evaluation's results.jsonl.

    pip install -e '.[bench]'
    python benchmarks/bench_crafting.py --shared ../shared --cache work-data/cache-cpu --out reports/crafting-benchmark

ART is a benchmark-only extra, never a runtime dependency.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from attacks import choose_setup
from attacks.base import PoisonSet, load_poisons, save_poisons
from attacks.crafting import craft, quantize
from attacks.experiment import Harness
from attacks.rows import read_rows
from attacks.scales import EvaluationConfig
from attacks.surrogates import SURROGATE_SEED


def time_ours(
    harness: Harness, surrogate, setup, eps: float, iterations: int, amp: torch.dtype | None, augment: bool
) -> float:
    config = replace(harness.craft_config, iterations=iterations, restarts=1, augment=augment)
    target = harness.test.load_image(setup.target_index)
    started = time.perf_counter()
    craft(
        "gradient-matching", [surrogate], harness.train, target, setup, eps, config, harness.device, amp, progress=False
    )
    return time.perf_counter() - started


def art_poisons(
    harness: Harness, surrogate, setup, eps: float, iterations: int, trials: int = 1
) -> tuple[PoisonSet, float]:
    """ART on exactly our poison images (percent_poison 1.0 of a training set made of them); (poisons, seconds)."""
    from art.attacks.poisoning import GradientMatchingAttack
    from art.estimators.classification import PyTorchClassifier

    classifier = PyTorchClassifier(
        model=surrogate,
        loss=torch.nn.CrossEntropyLoss(),
        input_shape=(3, *harness.train.image_size),
        nb_classes=harness.train.num_classes,
        clip_values=(0.0, 1.0),
        device_type="cpu",
    )
    attack = GradientMatchingAttack(
        classifier,
        percent_poison=1.0,
        epsilon=eps / 255,
        max_epochs=iterations,
        learning_rate_schedule=([0.1, 0.01, 0.001, 0.0001], [int(iterations * f) for f in (0, 3 / 8, 5 / 8, 7 / 8)]),
        max_trials=trials,
        batch_size=512,
        verbose=0,
    )
    images, labels, _ = harness.train.load_batch(np.asarray(setup.poison_indices))
    target = harness.test.load_image(setup.target_index)[None].float().div(255).numpy()
    np.random.seed(setup.key)  # ART permutes the (identical) poison images with numpy's global generator
    started = time.perf_counter()
    poisoned, _ = attack.poison(
        target, np.array([setup.intended_class]), images.float().div(255).numpy(), labels.numpy()
    )
    seconds = time.perf_counter() - started
    # ART returns the poison images in their original order (it writes them back at the permuted positions)
    deltas = quantize(images, torch.from_numpy(poisoned), eps)
    return PoisonSet(setup, eps, deltas, "art-gradient-matching", {"seconds": round(seconds, 2)}), seconds


def art_victims(harness: Harness, surrogate, keys: list[int], eps: float, victims: int, out: Path) -> list[dict]:
    """Full-strength ART poisons (250 iterations, the scale's restarts as trials) for each key, and victims trained on
    them exactly as the evaluation trains its undefended arm; one row per victim, appended to OUT/art_victims.jsonl."""
    rows_path = out / "art_victims.jsonl"
    done = (
        {(r["poison_key"], r["victim_seed"]) for r in map(json.loads, rows_path.read_text().splitlines())}
        if rows_path.exists()
        else set()
    )
    for key in keys:
        setup = choose_setup(key, harness.train, harness.test, 0.01)
        if all((key, seed) in done for seed in range(victims)):
            continue
        cached = harness.cache / f"art-{harness.poisons_path(setup).name}"
        if cached.exists():
            poisons = load_poisons(cached, setup)
        else:
            poisons, _ = art_poisons(
                harness, surrogate, setup, eps, harness.craft_config.iterations, harness.craft_config.restarts
            )
            save_poisons(poisons, cached)
        data = harness.data_for("undefended", poisons)
        for seed in range(victims):
            if (key, seed) in done:
                continue
            model, cost = harness.models.trained(data, seed, "victim-art")
            measured = harness.measure(model, setup)
            row = {
                "attack": "art-gradient-matching",
                "poison_key": key,
                "victim_seed": seed,
                "target_class": setup.target_class,
                "intended_class": setup.intended_class,
                "success": measured["target_pred"] == setup.intended_class,
                **measured,
                "seconds": {"crafting": poisons.metadata["seconds"], "victim_training": round(cost.wall, 1)},
            }
            with rows_path.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
    return [json.loads(line) for line in rows_path.read_text().splitlines()] if rows_path.exists() else []


def trial_phases(evaluation: list[dict], source: Path, model: str, epochs: int, eps: float) -> dict | None:
    """Mean measured seconds of each phase over an evaluation's undefended and clean rows of this scale (crafting
    counted once per key); None when there are none."""
    rows = [
        r
        for r in evaluation
        if r["model"] == model and r["epochs"] == epochs and r["eps"] == eps and r["arm"] in ("undefended", "clean")
    ]
    if not rows:
        return None
    crafting = {r["poison_key"]: r["seconds"]["crafting"] for r in rows if r["arm"] == "undefended"}
    return {
        "source": str(source),
        "surrogate_s": next((r["seconds"]["surrogate"] for r in rows if r["arm"] == "undefended"), None),
        "crafting_s_per_key": float(np.mean(list(crafting.values()))),
        "keys": len(crafting),
        "victim_training_s": float(np.mean([r["seconds"]["victim_training"] for r in rows])),
        "measure_s": float(np.mean([r["seconds"]["measure"] for r in rows])),
        "victims": len(rows),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=Path("../shared"))
    parser.add_argument("--cache", type=Path, default=Path("work-data/cache-cpu"))
    parser.add_argument("--out", type=Path, default=Path("reports/crafting-benchmark"))
    parser.add_argument("--results", type=Path, default=Path("reports/gradient-matching-cpu/results.jsonl"))
    parser.add_argument("--model", default=None)
    parser.add_argument("--key", type=int, default=0)
    parser.add_argument("--eps", type=float, default=16.0)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--success-keys", default="", help="Also craft full ART poisons for these keys and train victims on them."
    )
    parser.add_argument("--victims", type=int, default=2)
    args = parser.parse_args()
    if args.results.name != "results.jsonl":
        parser.error("--results names an evaluation's results.jsonl")
    evaluation = read_rows(args.results.parent) if args.results.exists() else []
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    data = args.shared / "data" / "cifar10"
    config = EvaluationConfig(scale="cpu", model=args.model, cache=str(args.cache))
    harness = Harness(data / "cifar10_train.npz", data / "cifar10_test.npz", args.out, config, progress=False)
    surrogate, _ = harness.models.trained(harness.train, SURROGATE_SEED, "surrogate")
    command = "python benchmarks/bench_crafting.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v not in (None, "")
    )
    results_path = args.out / "results.json"
    if args.repeats == 0:  # success only: keep the timings of the run that measured them (on a quiet machine)
        if not results_path.exists():
            parser.error(f"--repeats 0 keeps the timings in {results_path}, which does not exist")
        results = json.loads(results_path.read_text())
        results["success_command"] = command
    else:
        results = timing_results(harness, surrogate, args, command, evaluation)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.success_keys:
        keys = [int(k) for k in args.success_keys.split(",")]
        results["art_victims"] = art_victims(harness, surrogate, keys, args.eps, args.victims, args.out)
        results["our_victims"] = our_victims(evaluation, keys, args.eps, args.victims, harness.recipe.epochs)
    results_path.write_text(json.dumps(results, indent=1))
    (args.out / "README.md").write_text(render(results))
    print(render(results))


def timing_results(harness: Harness, surrogate, args: argparse.Namespace, command: str, evaluation: list[dict]) -> dict:
    """Interleaved timing repeats of every variant (so drift in machine load hits each alike), best of them."""
    setup = choose_setup(args.key, harness.train, harness.test, 0.01)
    poisons = len(setup.poison_indices)
    runs = {
        "ours_bf16_augment": lambda: time_ours(
            harness, surrogate, setup, args.eps, args.iterations, torch.bfloat16, True
        ),
        "ours_fp32_augment": lambda: time_ours(harness, surrogate, setup, args.eps, args.iterations, None, True),
        "ours_bf16_no_augment": lambda: time_ours(
            harness, surrogate, setup, args.eps, args.iterations, torch.bfloat16, False
        ),
        "ours_fp32_no_augment": lambda: time_ours(harness, surrogate, setup, args.eps, args.iterations, None, False),
        "art_fp32_no_augment": lambda: art_poisons(harness, surrogate, setup, args.eps, args.iterations)[1],
    }
    timings: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            timings[name].append(run())
    best = {name: min(values) / args.iterations for name, values in timings.items()}
    return {
        "command": command,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "model": harness.scale.model,
        "key": args.key,
        "poisons": poisons,
        "eps": args.eps,
        "iterations": args.iterations,
        "seconds_per_iteration_best": best,
        "seconds_all": timings,
        "poison_images_per_second": {name: poisons / s for name, s in best.items()},
        "speedup_over_art": {
            name: best["art_fp32_no_augment"] / s for name, s in best.items() if not name.startswith("art")
        },
        "trial_phases": trial_phases(evaluation, args.results, harness.scale.model, harness.recipe.epochs, args.eps),
    }


def our_victims(evaluation: list[dict], keys: list[int], eps: float, victims: int, epochs: int) -> list[dict]:
    """The evaluation's undefended rows for the same keys, seeds, eps and epochs as the ART victims (the comparison)."""
    return [
        r
        for r in evaluation
        if r["arm"] == "undefended"
        and r["poison_key"] in keys
        and r["victim_seed"] < victims
        and r["eps"] == eps
        and r["epochs"] == epochs
    ]


def render(results: dict) -> str:
    lines = [
        "# Gradient-matching crafting speed: ours against ART's GradientMatchingAttack",
        "",
        f"Command: `{results['command']}`",
        "",
        f"Machine: {results['machine']}. Model {results['model']}, key {results['key']}, {results['poisons']} poisons, eps {results['eps']:g}, "
        f"{results['iterations']} iterations, one restart, the same cached surrogate, target and poison images for every variant; "
        "best of the interleaved repeats.",
        "",
        "| variant | s / iteration | poison images / s | speed-up over ART |",
        "| --- | --- | --- | --- |",
    ]
    for name, seconds in results["seconds_per_iteration_best"].items():
        speedup = results["speedup_over_art"].get(name)
        lines.append(
            f"| {name} | {seconds:.3f} | {results['poison_images_per_second'][name]:.1f} | {'-' if speedup is None else f'{speedup:.2f}x'} |"
        )
    phases = results.get("trial_phases")
    if phases:
        lines += [
            "",
            f"Whole-trial phases (means over the {phases['victims']} undefended and clean victims of this scale in {phases['source']}): surrogate {phases['surrogate_s']:.0f} s "
            f"(once per scale), crafting {phases['crafting_s_per_key']:.0f} s per key ({phases['keys']} keys), victim training "
            f"{phases['victim_training_s']:.0f} s, measuring {phases['measure_s']:.1f} s.",
        ]
    victims = results.get("art_victims")
    if victims:
        flipped = sum(r["success"] for r in victims)
        ours = results.get("our_victims") or []
        lines += [
            "",
            f"Success at full strength (250 iterations, the scale's restarts as ART's trials), victims trained as the "
            f"undefended arm{' (command: `' + results['success_command'] + '`)' if 'success_command' in results else ''}:",
            "",
            "| poisons | keys | victims flipped | p(intended) per victim |",
            "| --- | --- | --- | --- |",
            f"| ART (no augmentation) | {sorted({r['poison_key'] for r in victims})} | {flipped} of {len(victims)} | {_p_intended(victims)} |",
        ]
        if ours:
            lines.append(
                f"| ours (differentiable augmentation; ../gradient-matching-cpu) | {sorted({r['poison_key'] for r in ours})} | "
                f"{sum(r['success'] for r in ours)} of {len(ours)} | {_p_intended(ours)} |"
            )
    if results.get("rerendered"):
        lines += ["", f"Note: {results['rerendered']}."]
    return "\n".join(lines) + "\n"


def _p_intended(rows: list[dict]) -> str:
    return ", ".join(f"{row['p_intended']:.3f}" for row in rows)


if __name__ == "__main__":
    main()
