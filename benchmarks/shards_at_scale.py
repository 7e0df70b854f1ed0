"""WebDataset shards against the ImageFolder they were packed from, on the ImageNet-shaped folder: the same examples,
skips and pixels, and what reading them costs.

The folder (benchmarks/imagenet_shaped.py's, bad files included) is packed once into tar shards of `--per-shard`
examples (`class_file.jpeg` + `class_file.cls` members, in the folder's order, the bad files too). Then, interleaved
and repeated: listing and the default header validation of each, a decoding pass over the first `--rows` examples at
`--side` px, and the index's memory per example (tracemalloc over the listing: the ids, paths and sources a scan holds
for every example, the part of its memory that grows with N). Checked before anything is timed: both keep the same
number of examples in the same classes, skip the same files and decode to identical pixels.

    python benchmarks/shards_at_scale.py --root work-data/imagenet-shaped --shards work-data/imagenet-shaped-shards \\
        --out reports/imagenet-shaped/shards.json
"""

from __future__ import annotations

import argparse
import io
import statistics
import tarfile
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch
from decoded_copy import pass_seconds  # run as a script: benchmarks/ is on the path
from run_record import write_results  # run as a script: benchmarks/ is on the path

from sanitize.data import open_dataset


def pack(root: Path, shards: Path, per_shard: int) -> int:
    """The folder's files as shards (written once; a marker says they are complete); returns the shard count."""
    marker = shards / ".complete"
    if marker.exists():
        return int(marker.read_text())
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    files = [(label, path) for label, name in enumerate(classes) for path in sorted((root / name).iterdir())]
    shards.mkdir(parents=True, exist_ok=True)
    count = 0
    for count, start in enumerate(range(0, len(files), per_shard), 1):
        with tarfile.open(shards / f"shard-{count - 1:05d}.tar", "w") as archive:
            for label, path in files[start : start + per_shard]:
                key = f"{path.parent.name}_{path.stem}"
                for name, data in ((f"{key}{path.suffix.lower()}", path.read_bytes()), (f"{key}.cls", b"%d" % label)):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
    marker.write_text(str(count))
    return count


def opened(path: Path) -> tuple[object, float, float]:
    """The dataset as a scan opens it by default, the seconds it took, and the listing's bytes per example."""
    tracemalloc.start()
    started = time.perf_counter()
    dataset = open_dataset(path, progress=False, validation="header")
    seconds = time.perf_counter() - started
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return dataset, seconds, held / len(dataset)


def same_examples(folder, shards, rows: int, work: Path) -> dict:
    """What both keep and skip, and whether the first `rows` decode to the same pixels (a late failure black in both)."""
    folder_keys = [f"{i.split('/')[0]}_{i.split('/')[-1].rsplit('.', 1)[0]}" for i in folder.ids]
    shard_keys = [i.split("/", 1)[1] for i in shards.ids]
    folder, shards = folder.record_failures_in(work / "folder"), shards.record_failures_in(work / "shards")
    pixels_equal = folder_keys == shard_keys and all(
        torch.equal(folder.load_image(i), shards.load_image(i)) for i in range(rows)
    )
    return {
        "kept": [len(folder), len(shards)],
        "same_keys_in_order": folder_keys == shard_keys,
        "same_labels": bool(np.array_equal(folder.labels, shards.labels)),
        "skipped_reasons": [sorted(s.reason for s in folder.skipped), sorted(s.reason for s in shards.skipped)],
        "late_failures": [sorted(folder.late_failures().values()), sorted(shards.late_failures().values())],
        "pixels_equal_first_rows": pixels_equal,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("work-data/imagenet-shaped"))
    parser.add_argument("--shards", type=Path, default=Path("work-data/imagenet-shaped-shards"))
    parser.add_argument("--per-shard", type=int, default=1000)
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--side", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("reports/imagenet-shaped/shards.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    count = pack(args.root, args.shards, args.per_shard)
    timings: dict[str, dict[str, list[float]]] = {
        kind: {"open_seconds": [], "index_bytes_per_example": [], "decode_ms_per_image": []}
        for kind in ("folder", "shards")
    }
    check = None
    for _ in range(args.repeats):  # interleaved: each repeat measures both once
        datasets = {}
        for kind, path in (("folder", args.root), ("shards", args.shards)):
            dataset, seconds, per_example = opened(path)
            datasets[kind] = dataset
            timings[kind]["open_seconds"].append(seconds)
            timings[kind]["index_bytes_per_example"].append(per_example)
            sized = open_dataset(path, image_size=args.side, progress=False, validation="header")
            with tempfile.TemporaryDirectory() as failures:  # the truncated file: black, as in a scan
                seconds = pass_seconds(sized.record_failures_in(Path(failures)), args.rows)
            timings[kind]["decode_ms_per_image"].append(seconds / args.rows * 1000)
        if check is None:
            with tempfile.TemporaryDirectory() as work:
                check = same_examples(datasets["folder"], datasets["shards"], args.rows, Path(work))
    files = check["kept"][0] + len(datasets["folder"].skipped)
    medians = {kind: {name: statistics.median(v) for name, v in t.items()} for kind, t in timings.items()}
    result = {
        "shards": count,
        "per_shard": args.per_shard,
        "decode_side": args.side,
        "same": check,
        "medians": {kind: {name: round(v, 2) for name, v in m.items()} for kind, m in medians.items()},
        "open_files_per_second": {kind: round(files / m["open_seconds"], 1) for kind, m in medians.items()},
        "shards_over_folder": {
            name: round(medians["shards"][name] / medians["folder"][name], 2) for name in medians["folder"]
        },
    }
    write_results(args.out, result)


if __name__ == "__main__":
    main()
