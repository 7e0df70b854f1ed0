"""Memory of listing an ImageFolder with ImageNet's file count: what a scan keeps per file, and the listing's peak.

    python benchmarks/listing_memory.py --root work-data/listing --sizes 10000,100000,1281167 \
        --out reports/imagenet-shaped/listing-memory.json

The folders hold empty files (listing reads names, not pixels) in 1,000 class folders named as ImageNet's are
(n01440764/n01440764_10026.JPEG). Each size is listed in a fresh process: the Python heap's peak during the listing
and what stays allocated for the entries afterwards (tracemalloc), the process's peak RSS, and the time. Validation
(decoding) is not part of it: the scan's other phases are measured in ../scan-scaling.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

from run_record import write_results

CLASSES = 1000


def build(root: Path, size: int) -> None:
    """`size` empty image files spread over CLASSES class folders (written once; a rerun reuses them)."""
    if (root / ".complete").exists():
        return
    for index in range(size):
        folder = root / f"n{index % CLASSES:08d}"
        if index < CLASSES:
            folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{folder.name}_{index // CLASSES:06d}.JPEG").touch()
    (root / ".complete").touch()


def measure(root: Path) -> dict:
    """List `root` as open_folder does before validating, in this process."""
    from sanitize.data.folder import _entry, _list_classes

    tracemalloc.start()
    started = time.perf_counter()
    _, files, _, _ = _list_classes(root)
    entries = [_entry(path, label, root) for path, label in files]
    del files
    kept, peak = tracemalloc.get_traced_memory()
    return {
        "files": len(entries),
        "seconds": round(time.perf_counter() - started, 2),
        "heap_peak_mb": round(peak / 2**20, 1),
        "heap_kept_mb": round(kept / 2**20, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--sizes", default="10000,100000,1281167")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # the child process: list one folder
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        root = args.root / f"n{size}"
        build(root, size)
        child = [sys.executable, __file__, "--root", str(args.root), "--out", str(args.out), "--measure", str(root)]
        row = json.loads(subprocess.run(child, capture_output=True, text=True, check=True).stdout)
        row |= {"heap_kept_bytes_per_file": round(row["heap_kept_mb"] * 2**20 / size)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    write_results(args.out, {"command": " ".join(sys.argv), "rows": rows})


if __name__ == "__main__":
    main()
