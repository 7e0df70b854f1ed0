"""Benchmark of Bullseye Polytope: ours (attacks/bullseye.py) against IBM ART's `BullseyePolytopeAttackPyTorch`, and
Poison Frogs against ART's `FeatureCollisionAttack`, in the transfer setting of `sanitize evaluate-transfer`.

Same extractor (the setting's cached one), same targets, same base images, same eps and iterations; each attack's
poisons fine-tune linear victims (seeds 0 and 1). Reports crafting seconds, success and p(intended) per key; an ART
attack that raises is recorded with its one-line error. ART is a benchmark-only extra, never a runtime dependency.

    pip install -e '.[bench]'
    python benchmarks/bench_feature_collision.py --train cifar10_train.npz --test cifar10_test.npz \
        --cache work-data/cache-transfer --out reports/feature-collision/art-benchmark
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from attacks.base import PoisonSet
from attacks.crafting import quantize
from attacks.experiment import arm_data
from attacks.summary import git_commit
from attacks.transfer import TransferConfig, TransferSetting

ART_ATTACKS = {"bullseye-polytope": "BullseyePolytopeAttackPyTorch", "poison-frogs": "FeatureCollisionAttack"}


class _Normalise(torch.nn.Module):
    def __init__(self, model) -> None:
        super().__init__()
        self.mean, self.std = model.mean, model.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def art_poisons(setting: TransferSetting, attack: str, setup, iterations: int) -> tuple[PoisonSet, float]:
    """ART's poisons for `setup`, called as its documentation shows: the extractor as a PyTorchClassifier whose layer 1
    is the penultimate feature, the bases as `x`, the target image as `target`."""
    from art.attacks import poisoning
    from art.estimators.classification import PyTorchClassifier

    model = setting.extractor
    sequential = torch.nn.Sequential(_Normalise(model), model.body, model.head).eval()
    classifier = PyTorchClassifier(
        sequential,
        loss=torch.nn.CrossEntropyLoss(),
        input_shape=(3, *setting.finetune.image_size),
        nb_classes=model.num_classes,
        clip_values=(0.0, 1.0),
    )
    positions = np.asarray(setup.poison_indices)
    bases = setting.finetune.load_batch(positions)[0].float().div(255).numpy()
    target = setting.test.load_image(setup.target_index).float().div(255)[None].numpy()
    eps = setting.config.eps
    if attack == "bullseye-polytope":
        # ART's defaults otherwise (endtoend=True: its endtoend=False path detaches the features and cannot run)
        art = poisoning.BullseyePolytopeAttackPyTorch(
            classifier, target, 1, max_iter=iterations, learning_rate=0.04, epsilon=eps / 255, verbose=False
        )
    else:
        art = poisoning.FeatureCollisionAttack(classifier, target, 1, max_iter=iterations, verbose=False)
    labels = np.eye(model.num_classes)[np.full(len(positions), setup.intended_class)]
    started = time.perf_counter()
    poisoned, _ = art.poison(bases, labels)
    seconds = time.perf_counter() - started
    clean = setting.finetune.load_batch(positions)[0]
    deltas = quantize(clean, torch.from_numpy(np.asarray(poisoned, dtype=np.float32)), eps)
    return PoisonSet(setup, eps, deltas, f"art-{attack}"), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", required=True)
    parser.add_argument("--test", required=True)
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--attack", choices=sorted(ART_ATTACKS), default="bullseye-polytope")
    parser.add_argument("--keys", default="0-7")
    parser.add_argument("--eps", type=float, default=25.0)
    parser.add_argument("--iterations", type=int, default=4000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    low, _, high = args.keys.partition("-")
    keys = range(int(low), int(high or low) + 1)
    config = TransferConfig(attack=args.attack, eps=args.eps, craft_options={"iterations": args.iterations})
    setting = TransferSetting(args.train, args.test, config, args.cache)
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.jsonl"
    done = (
        {(r["attack"], r["implementation"], r["key"]) for r in map(json.loads, results.open())}
        if results.exists()
        else set()
    )
    for key in keys:
        setup = setting.setup(key)
        for implementation in ("sanitize", "art"):
            if (args.attack, implementation, key) in done:
                continue
            row = {"attack": args.attack, "implementation": implementation, "key": key, "eps": args.eps}
            row |= {"iterations": args.iterations, "commit": (git_commit() or "")[:7]}
            try:
                if implementation == "sanitize":
                    poisons = setting.poisons(setup)
                    seconds = poisons.metadata["seconds"]
                else:
                    poisons, seconds = art_poisons(setting, args.attack, setup, args.iterations)
            except Exception as error:  # an ART failure is a result, recorded in one line
                row["error"] = (
                    f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
                )
            else:
                victims = [
                    setting.measure(
                        setting.victim(arm_data(setting.finetune, "undefended", poisons, setup, args.eps), seed), setup
                    )
                    for seed in (0, 1)
                ]
                row |= {"craft_seconds": round(seconds, 1), "largest_change": int(poisons.deltas.abs().max())}
                row |= {"success": [v["target_pred"] == setup.intended_class for v in victims]}
                row |= {"p_intended": [v["p_intended"] for v in victims]}
            with results.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    write_table(args.out)


def write_table(out: Path) -> None:
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]
    lines = [
        "| attack | implementation | eps | iterations | keys | victims flipped | median p(intended) | craft s per key | errors |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["attack"], r["implementation"], r["eps"], r["iterations"]), []).append(r)
    for (attack, implementation, eps, iterations), group in sorted(groups.items()):
        ran = [r for r in group if "error" not in r]
        flipped = sum(sum(r["success"]) for r in ran)
        p = [x for r in ran for x in r["p_intended"]]
        seconds = [r["craft_seconds"] for r in ran]
        errors = sorted({r["error"] for r in group if "error" in r})
        lines.append(
            f"| {attack} | {implementation} | {eps:g} | {iterations} | {len(group)} | {flipped} of {2 * len(ran)} "
            f"| {np.median(p) if p else float('nan'):.3f} | {np.mean(seconds) if seconds else float('nan'):.0f} | {'; '.join(errors) or '-'} |"
        )
    (out / "summary.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
