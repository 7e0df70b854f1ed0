"""Diagnose an evaluation: each cached model's probabilities of the target and intended class on a key's target.

    python benchmarks/target_probabilities.py OUT KEY [--cache DIR] [--scale cpu]

Success is all-or-nothing; this shows how far poisons moved the target when they did not flip it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from attacks import choose_setup
from attacks.evaluate import EvaluationConfig, Harness

SHARED = Path("../shared/data/cifar10")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("key", type=int)
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--scale", default="cpu")
    parser.add_argument("--budget", type=float, default=0.01)
    args = parser.parse_args()
    config = EvaluationConfig(scale=args.scale, cache=str(args.cache) if args.cache else None)
    harness = Harness(SHARED / "cifar10_train.npz", SHARED / "cifar10_test.npz", args.out, config, progress=False)
    setup = choose_setup(args.key, harness.train, harness.test, args.budget)
    target = harness.test.load_image(setup.target_index)[None].float() / 255
    print(f"key {args.key}: target {setup.target_id} class {setup.target_class} -> intended {setup.intended_class}")
    for path in sorted(harness.cache.glob("*.pt")):
        if path.name.startswith("poisons") or ".partial" in path.name:
            continue
        model = harness.new_model(0)
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["model"])
        with torch.no_grad():
            p = torch.softmax(model.eval()(target), dim=1)[0]
        print(f"{path.stem}: p(target class) {p[setup.target_class]:.3f}  p(intended) {p[setup.intended_class]:.3f}  argmax {int(p.argmax())}")


if __name__ == "__main__":
    main()
