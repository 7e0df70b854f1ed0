"""Diagnose an evaluation's poisons with its cached models: how far they moved the target, and whether they transfer.

    python benchmarks/diagnose_poisons.py --cache work-data/cache-cpu --keys 0,1 [--model NAME] [--epochs E] [--victims V]

For each key whose poisons are cached, and each cached model (the surrogate; clean, undefended and random-noise
victims of seeds 0..V-1), prints the model's probability of the target's class and of the intended class on the target,
and the alignment loss 1 - cos(grad CE(target, intended), grad CE(poison images, labels)) in fp32 without augmentation
for the poison images as they were (clean), with the random-noise control, and as crafted, and the model's mean
cross-entropy on the poison images unperturbed and as crafted (has it fitted them?). Success is all-or-nothing;
these say whether crafting fitted the surrogate, whether the alignment holds on models the attacker never saw, and how
close the victims came.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from attacks import choose_setup
from attacks.base import load_poisons
from attacks.crafting import parameter_gradient
from attacks.experiment import Harness
from attacks.gradient_matching import alignment_loss
from attacks.scales import EvaluationConfig
from attacks.surrogates import SURROGATE_SEED
from sanitize.models import Classifier


def alignment(
    model: Classifier, target: torch.Tensor, intended: int, images: torch.Tensor, labels: torch.Tensor
) -> float:
    target_grad = [g.detach() for g in parameter_gradient(model, target, torch.tensor([intended]), False, None)]
    target_norm = torch.sqrt(sum(g.pow(2).sum() for g in target_grad))
    return float(alignment_loss(parameter_gradient(model, images, labels, False, None), target_grad, target_norm))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=Path("../shared"))
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--keys", default="0")
    parser.add_argument("--model", default=None)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--victims", type=int, default=4)
    parser.add_argument("--eps", type=float, default=16.0)
    args = parser.parse_args()
    data = args.shared / "data" / "cifar10"
    config = EvaluationConfig(scale="cpu", model=args.model, epochs=args.epochs, eps=args.eps, cache=str(args.cache))
    harness = Harness(data / "cifar10_train.npz", data / "cifar10_test.npz", args.cache, config, progress=False)
    print(
        "| key | target -> intended | model | p(target class) | p(intended) | 1-cos clean | 1-cos noise | 1-cos poisoned | CE clean | CE poisoned |"
    )
    print("|" + " --- |" * 10)
    for key in (int(k) for k in args.keys.split(",")):
        setup = choose_setup(key, harness.train, harness.test, config.budget)
        path = harness.poisons_path(setup)
        if not path.exists():
            print(f"| {key} | no cached poisons ({path.name}) | | | | | | |")
            continue
        poisons = load_poisons(path, setup)
        positions = np.asarray(setup.poison_indices)
        labels = torch.from_numpy(harness.train.labels[positions]).long()
        versions = {
            arm: torch.from_numpy(harness.data_for(arm, poisons).images[positions]).permute(0, 3, 1, 2).float() / 255
            for arm in ("clean", "random-noise", "undefended")
        }
        target = harness.test.load_image(setup.target_index)[None].float() / 255
        models = [("surrogate", harness.models.path(harness.train, SURROGATE_SEED, "surrogate"))]
        models += [
            (f"{arm} victim {seed}", harness.models.path(harness.data_for(arm, poisons), seed, f"victim-{arm}"))
            for arm in ("clean", "random-noise", "undefended")
            for seed in range(args.victims)
        ]
        for name, model_path in models:
            if not model_path.exists():
                continue
            model = harness.models.new_model(0)
            model.load_state_dict(torch.load(model_path, map_location="cpu", weights_only=True)["model"])
            model.eval()
            with torch.no_grad():
                p = torch.softmax(model(target), dim=1)[0]
                fit = [float(F.cross_entropy(model(versions[arm]), labels)) for arm in ("clean", "undefended")]
            losses = [
                alignment(model, target, setup.intended_class, versions[arm], labels)
                for arm in ("clean", "random-noise", "undefended")
            ]
            print(
                f"| {key} | {setup.target_class} -> {setup.intended_class} | {name} | {p[setup.target_class]:.3f} | {p[setup.intended_class]:.3f} | "
                + " | ".join(f"{v:.3f}" for v in losses + fit)
                + " |",
                flush=True,
            )


if __name__ == "__main__":
    main()
