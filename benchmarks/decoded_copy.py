"""What the decoded copy (sanitize.data.decoded) saves on an ImageNet-shaped folder: reading an image in a pass after
the first, from the copy, against decoding its JPEG again as every pass did without one.

For each side, over the folder's first `--rows` files, interleaved and repeated (so the ratios hold on a busy
machine): a pass without a copy (read, decode, resize, crop), the first pass with one (the same, plus storing the
pixels) and a later pass (the copy read back, each row checked). The folder is benchmarks/imagenet_shaped.py's.

    python benchmarks/decoded_copy.py --root work-data/imagenet-shaped --sides 224,112,64 --rows 512 \\
        --out reports/imagenet-shaped/decoded-copy.json
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from run_record import write_results  # run as a script: benchmarks/ is on the path

from sanitize.data import iterate_batches, open_dataset
from sanitize.data.decoded import copy_bytes


def pass_seconds(dataset, rows: int, batch_size: int = 64) -> float:
    """One pass over the first `rows` examples, as a phase reads them."""
    started = time.perf_counter()
    for _ in iterate_batches(dataset, np.arange(rows), batch_size):
        pass
    return time.perf_counter() - started


def measure(root: Path, side: int, rows: int, repeats: int) -> dict:
    """Milliseconds an image for the three passes at one side, each the median of `repeats`."""
    plain = open_dataset(root, image_size=side, progress=False, validation="header")
    timings: dict[str, list[float]] = {"decode": [], "first_pass_with_copy": [], "from_copy": []}
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as work:
            failures = Path(work) / "late"  # the folder's truncated file: a black image, as in a scan
            kept = plain.record_failures_in(failures).with_decoded_copy(Path(work) / "decoded")
            timings["decode"].append(pass_seconds(plain.record_failures_in(failures), rows))
            timings["first_pass_with_copy"].append(pass_seconds(kept, rows))
            timings["from_copy"].append(pass_seconds(kept, rows))
    ms = {name: statistics.median(values) / rows * 1000 for name, values in timings.items()}
    return {
        "side": side,
        "rows": rows,
        "ms_per_image": {name: round(value, 3) for name, value in ms.items()},
        "decode_over_from_copy": round(ms["decode"] / ms["from_copy"], 1),
        "first_pass_overhead": round(ms["first_pass_with_copy"] / ms["decode"], 3),
        "copy_gb_at_imagenet_1k": round(copy_bytes(1_281_167, (side, side)) / 1e9, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("work-data/imagenet-shaped"))
    parser.add_argument("--sides", default="224,112,64")
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("reports/imagenet-shaped/decoded-copy.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = {
        "sides": [measure(args.root, int(side), args.rows, args.repeats) for side in args.sides.split(",")],
    }
    write_results(args.out, result)


if __name__ == "__main__":
    main()
