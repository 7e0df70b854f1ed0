"""Victim-training throughput on this CPU: one process with every thread, against one single-thread process per core.

Issue 4 asks whether running victims side by side beats one victim at a time. Each arrangement trains the cpu
scale's victim (model, subset, recipe) for `--epochs` epochs from scratch, several at once in the parallel case;
throughput is victim-epochs per second, compared in one run, with and without the processes' start-up (loading
the data, which a long evaluation pays once).

    python benchmarks/bench_parallel_victims.py --shared ../shared --epochs 4 --repeats 2 --out reports/parallel-victims
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from attacks.experiment import Harness
from attacks.scales import EvaluationConfig
from sanitize.training import train_model


def train_victims(shared: str, epochs: int, threads: int, seed: int) -> float:
    """Train one cpu-scale victim for `epochs` with `threads` threads; returns seconds."""
    torch.set_num_threads(threads)
    data = Path(shared) / "data" / "cifar10"
    harness = Harness(
        data / "cifar10_train.npz",
        data / "cifar10_test.npz",
        Path("/tmp"),
        EvaluationConfig(scale="cpu", cache="/tmp/bench-parallel-cache"),
        progress=False,
    )
    recipe = dataclasses.replace(harness.recipe, epochs=epochs, seed=seed)
    model = harness.models.new_model(seed)
    started = time.perf_counter()
    train_model(
        model, harness.train, np.arange(len(harness.train)), recipe, harness.device, harness.amp, progress=False
    )
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", default="../shared")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("reports/parallel-victims"))
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    context = multiprocessing.get_context("spawn")
    sequential, sequential_wall, each, parallel = [], [], [], []
    for _ in range(args.repeats):  # interleaved, so drift in machine load hits both arrangements alike
        started = time.perf_counter()
        with context.Pool(1) as pool:
            sequential.append(pool.apply(train_victims, (args.shared, args.epochs, cores, 0)))
        sequential_wall.append(time.perf_counter() - started)
        started = time.perf_counter()
        with context.Pool(cores) as pool:
            each.append(pool.starmap(train_victims, [(args.shared, args.epochs, 1, seed) for seed in range(cores)]))
        parallel.append(time.perf_counter() - started)
    best_sequential = min(sequential)
    best_each = min(max(times) for times in each)  # the slower process of the best parallel repeat
    results = {
        "command": f"python benchmarks/bench_parallel_victims.py --shared {args.shared} --epochs {args.epochs} --repeats {args.repeats} --out {args.out}",
        "machine": {"platform": platform.platform(), "cpus": cores, "torch": torch.__version__},
        "epochs": args.epochs,
        f"one_process_{cores}_threads_training_s": [round(s, 1) for s in sequential],
        f"{cores}_processes_1_thread_training_s": [[round(s, 1) for s in times] for times in each],
        f"one_process_{cores}_threads_wall_s": [round(s, 1) for s in sequential_wall],
        f"{cores}_processes_wall_s": [round(s, 1) for s in parallel],
        "parallel_speedup_wall": cores * min(sequential_wall) / min(parallel),
        "parallel_speedup_training": cores * best_sequential / best_each,  # without process start-up and data loading
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
