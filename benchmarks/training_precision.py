"""Training throughput by precision and memory format: fp32 or bf16 autocast, contiguous or channels_last.

The product trains (proxies, victims, robust training) under bf16 autocast and channels_last where the hardware runs
bf16 natively; this measures what each choice buys on this machine, per model, through the product's own training
loop (`train_model`: augmentation, autocast, SGD step), in one run with the arrangements interleaved.

    python benchmarks/training_precision.py --out reports/training-precision
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import numpy as np
import torch
from run_record import write_results  # run as a script: benchmarks/ is on the path

from sanitize.config import TrainConfig
from sanitize.data.arrays import from_arrays
from sanitize.models import create_model
from sanitize.training import resolve_precision, train_model

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}
FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
MODELS = {"convnet": {}, "resnet18_cifar": {"width": 16}}  # the scan's proxy; the full scale's victim


def images_per_second(dataset, model_name: str, precision: str, memory_format: str, batch_size: int) -> float:
    """One epoch of `dataset` from a fresh model through `train_model`; images per second of training."""
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=10, **MODELS[model_name])
    config = TrainConfig(epochs=1, batch_size=batch_size)
    history = train_model(
        model,
        dataset,
        np.arange(len(dataset)),
        config,
        torch.device("cpu"),
        PRECISIONS[precision],
        progress=False,
        memory_format=FORMATS[memory_format],
    )
    return history[-1]["examples"] / history[-1]["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2048, help="images per timed epoch (random CIFAR-sized)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds, after one untimed warm-up round")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the evaluation's shards use 1)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (args.images, 32, 32, 3), dtype=np.uint8)
    dataset = from_arrays(x, rng.integers(0, 10, args.images), [str(c) for c in range(10)], source="random")
    arrangements = [(m, p, f) for m in MODELS for p in PRECISIONS for f in FORMATS]
    rates: dict[tuple[str, str, str], list[float]] = {a: [] for a in arrangements}
    for round_ in range(args.repeats + 1):
        for arrangement in arrangements:  # interleaved, so load drifts hit every arrangement alike
            rate = images_per_second(dataset, *arrangement, args.batch_size)
            if round_:
                rates[arrangement].append(rate)
    rows = []
    for model_name in MODELS:
        base = statistics.median(rates[(model_name, "fp32", "contiguous")])
        for p in PRECISIONS:
            for f in FORMATS:
                median = statistics.median(rates[(model_name, p, f)])
                rows.append(
                    {
                        "model": model_name,
                        **MODELS[model_name],
                        "precision": p,
                        "memory_format": f,
                        "images_per_s": rates[(model_name, p, f)],
                        "median": median,
                        "vs_fp32_contiguous": median / base,
                    }
                )
    bf16_native = resolve_precision("auto", torch.device("cpu")) is not None  # what the product's default picks here
    write_results(
        args.out / "results.json",
        {"args": vars(args) | {"out": str(args.out)}, "bf16_native": bf16_native, "rows": rows},
    )
    lines = [
        "| model | precision | memory format | images/s (median) | vs fp32 contiguous |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r['model']} | {r['precision']} | {r['memory_format']} | {r['median']:.0f} | {r['vs_fp32_contiguous']:.2f}x |"
        for r in rows
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
