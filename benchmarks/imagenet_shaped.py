"""An ImageNet-shaped ImageFolder (no ImageNet, no download) and what reading it costs: the first measurement of the
large-data path (issue: `sanitize scan ./imagenet`).

The folder: `--classes` class folders of `--per-class` JPEGs each, of ImageNet's shape (sides drawn around its
typical 500 x 375, aspect ratios 3:4 to 16:9, quality 92, some greyscale and CMYK files as ImageNet has), their
content CIFAR-10 images (../shared, else noise) upscaled with added grain so the files weigh what ImageNet's do
(~110 KB), plus the bad files a crawl contains (empty, truncated, a text file, a decompression bomb). Then, in one
run and interleaved (so the ratios hold on a busy machine): listing and validating the folder as `sanitize scan` does
by default (`--validation header`: every file read and hashed, its header parsed, no pixel decoded) against the full
validation (every file decoded), with 0 and with `--workers` DataLoader workers; with `--embed-rows N`, also the
embedding pass of an ImageNet ResNet-18 (1,000 classes, 224 px, the gradient sketched) over the first N files against
a plain forward pass of the same model on the same files (the issue's limit: >= 0.9x).

    python benchmarks/imagenet_shaped.py --root work-data/imagenet-shaped --classes 100 --per-class 100 \\
        --out reports/imagenet-shaped
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_scan import embedding_overhead  # run as a script: benchmarks/ is on the path
from PIL import Image
from run_record import write_results  # run as a script: benchmarks/ is on the path

from sanitize.data import iterate_batches, open_dataset
from sanitize.models import create_model, default_model_name
from sanitize.training import autocast, precision_name, resolve_precision, to_model_input

BAD_FILES = ("empty.jpg", "truncated.jpg", "notes.jpg", "bomb.png")


def source_images(shared: Path, count: int, seed: int) -> np.ndarray:
    """`count` 32 x 32 RGB images: CIFAR-10's when ../shared has it, else smooth noise."""
    path = shared / "data" / "cifar10" / "cifar10_train.npz"
    rng = np.random.default_rng(seed)
    if path.exists():
        with np.load(path, allow_pickle=False) as data:
            images = data["x_train"] if "x_train" in data else data["x"]
            return images[rng.choice(len(images), count, replace=count > len(images))]
    return rng.integers(0, 256, (count, 4, 4, 3), dtype=np.uint8).repeat(8, 1).repeat(8, 2)


def shaped_jpeg(image: np.ndarray, rng: np.random.Generator, path: Path) -> int:
    """One ImageNet-shaped JPEG from a small image; returns its size in bytes."""
    width = int(np.clip(rng.normal(470, 90), 200, 900))
    aspect = rng.choice([3 / 4, 1.0, 4 / 3, 4 / 3, 4 / 3, 3 / 2, 16 / 9])
    height = int(round(width / aspect))
    big = np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR), dtype=np.float32)
    big += rng.normal(0, 24, big.shape)  # grain: upscaled 32 px images alone compress far below ImageNet's weight
    picture = Image.fromarray(big.clip(0, 255).astype(np.uint8))
    mode = rng.random()
    if mode < 0.01:
        picture = picture.convert("L")
    elif mode < 0.012:
        picture = picture.convert("CMYK")
    picture.save(path, "JPEG", quality=92)
    return path.stat().st_size


def make_folder(root: Path, classes: int, per_class: int, shared: Path, seed: int = 0) -> dict:
    """Writes the folder once (a marker says it is complete); returns its size statistics."""
    marker = root / ".complete.json"
    if marker.exists():
        return json.loads(marker.read_text())
    rng = np.random.default_rng(seed)
    sources = source_images(shared, classes * per_class, seed)
    sizes = []
    for c in range(classes):
        folder = root / f"n{c:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            sizes.append(shaped_jpeg(sources[c * per_class + i], rng, folder / f"n{c:08d}_{i}.JPEG"))
    bad = root / "n00000000"
    (bad / BAD_FILES[0]).write_bytes(b"")
    whole = (root / "n00000001" / "n00000001_0.JPEG").read_bytes()
    (bad / BAD_FILES[1]).write_bytes(whole[: len(whole) // 2])
    (bad / BAD_FILES[2]).write_text("not an image\n")
    Image.new("L", (10000, 10000)).save(bad / BAD_FILES[3])  # 100 Mpx: over the scan's pixel cap, a few KB on disk
    stats = {
        "classes": classes,
        "per_class": per_class,
        "images": len(sizes),
        "bad_files": len(BAD_FILES),
        "mean_kb": round(float(np.mean(sizes)) / 1024, 1),
        "total_gb": round(float(np.sum(sizes)) / 2**30, 2),
    }
    marker.write_text(json.dumps(stats))
    return stats


def validate(root: Path, workers: int, validation: str) -> tuple[int, int, float]:
    """`sanitize scan`'s listing and validation: (kept, skipped, seconds)."""
    started = time.perf_counter()
    dataset = open_dataset(root, workers=workers, progress=False, validation=validation)
    return len(dataset), len(dataset.skipped), time.perf_counter() - started


def proxy_costs(root: Path, sides: list[int], rows: int, batch_size: int = 64) -> list[dict]:
    """What a proxy trained from scratch costs per image at each side, in two parts measured apart: reading the files
    (decode, resize, crop: CPU work wherever the network runs) and one SGD step of the network (channels_last, at the
    precision a scan trains with: bf16 autocast where the hardware runs it natively, else fp32); for the model
    `--model auto` picks at that side and for an ImageNet ResNet-18."""
    device = torch.device("cpu")
    amp = resolve_precision("auto", device)
    found = []
    for side in sides:
        with tempfile.TemporaryDirectory() as failures:  # the truncated file: a black image, as in a scan
            dataset = open_dataset(root, image_size=side, progress=False, validation="header")
            dataset = dataset.record_failures_in(Path(failures))
            indices = np.arange(rows)
            started = time.perf_counter()
            batches = [(images, labels) for images, labels, _ in iterate_batches(dataset, indices, batch_size)]
            read_ms = (time.perf_counter() - started) / rows * 1000
        for name in sorted({default_model_name((side, side)), "resnet18"}):
            torch.manual_seed(0)
            model = create_model(name, dataset.num_classes, (3, side, side)).to(memory_format=torch.channels_last)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            step_seconds = []
            for images, labels in [batches[0], *batches]:  # the first batch twice: a warm-up, not timed
                started = time.perf_counter()
                with autocast(device, amp):
                    loss = torch.nn.functional.cross_entropy(model(to_model_input(images, device)), labels)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                step_seconds.append(time.perf_counter() - started)
            step_ms = sum(step_seconds[1:]) / rows * 1000
            found.append(
                {
                    "side": side,
                    "model": name,
                    "read_ms_per_image": round(read_ms, 2),
                    "step_ms_per_image": round(step_ms, 2),
                    "precision": precision_name(amp),
                }
            )
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("work-data/imagenet-shaped"))
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--shared", type=Path, default=Path("../shared"))
    parser.add_argument("--out", type=Path, default=Path("reports/imagenet-shaped"))
    parser.add_argument("--embed-rows", type=int, default=0, help="also time the embedding pass on this many files")
    parser.add_argument("--proxy-sides", default="", help="also time a proxy's training per image at these sides")
    parser.add_argument("--proxy-rows", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the networks (decoding stays one)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    stats = make_folder(args.root, args.classes, args.per_class, args.shared)
    stats["write_seconds"] = round(time.perf_counter() - started, 1)
    ways = [("header", 0), ("full", 0), ("full", args.workers)]
    runs: dict[str, list[float]] = {f"{validation}_workers_{workers}": [] for validation, workers in ways}
    outcome = {}
    for _ in range(args.repeats):  # interleaved: each repeat measures every way once
        for validation, workers in ways:
            kept, skipped, seconds = validate(args.root, workers, validation)
            runs[f"{validation}_workers_{workers}"].append(seconds)
            outcome[validation] = {"kept": kept, "skipped": skipped}
    files = stats["images"] + stats["bad_files"]
    best = {name: min(values) for name, values in runs.items()}
    result = {
        "folder": stats,
        "outcome": outcome,
        "seconds_best_of_repeats": {k: round(v, 2) for k, v in best.items()},
        "files_per_second": {k: round(files / v, 1) for k, v in best.items()},
        "full_over_header": round(best["full_workers_0"] / best["header_workers_0"], 1),
        "workers_speedup_full": round(best["full_workers_0"] / best[f"full_workers_{args.workers}"], 2),
        "embedding_pass": embedding_overhead(
            open_dataset(args.root, image_size=224, progress=False),
            args.root.parent / "imagenet-shaped-embeddings",
            batch_size=64,
            rows=args.embed_rows,
            model_name="resnet18",
        )
        if args.embed_rows
        else None,
        "proxy_costs": proxy_costs(args.root, [int(v) for v in args.proxy_sides.split(",")], args.proxy_rows)
        if args.proxy_sides
        else None,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    write_results(args.out / "results.json", result)


if __name__ == "__main__":
    main()
