"""A sample audit report from the CIFAR-10 evaluation, its screenshot, and the report's size on a 50,000-image scan.

    python benchmarks/sample_report.py --cache work-data/cache-cpu --key 0 --work work-data/sample-report \
        [--large-scan work-data/scan-npz] --out reports/sample-report

Writes key K's poisoned set (the cpu scale's 10,000 CIFAR-10 images with its eps-16 gradient-matching poisons, cached
by `sanitize evaluate`) losslessly with its manifest and target to WORK, scans it with the default rule on the proxy
the evaluation's `scan` arm trained (`--checkpoint`, so the flags are the arm's) and `--manifest`, copies report.html
to OUT, screenshots it in headless Chromium, and re-renders the report of a finished large scan to measure its size.
OUT/README.md gets the numbers.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from attacks import choose_setup, write_poisoned
from attacks.experiment import Harness
from attacks.scales import EvaluationConfig
from sanitize import scan
from sanitize.report import write_report

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--hide-scrollbars",
]


def screenshot(page: Path, png: Path, profile: Path, height: int) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if not browser:
        raise SystemExit("no chromium on PATH (Debian: apt-get install chromium)")
    subprocess.run(
        [
            browser,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            f"--screenshot={png}",
            f"--window-size=1150,{height}",
            page.resolve().as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=180,
    )


def fit_to_content(png: Path, margin: int = 16) -> int:
    """Crop the screenshot's blank bottom (a report shorter than the window) so the image is as long as the page's
    content; returns the height kept."""
    import numpy as np
    from PIL import Image

    with Image.open(png) as image:
        pixels = np.asarray(image.convert("RGB"))
        used = np.flatnonzero((pixels != pixels[-1:, :, :]).any(axis=(1, 2)))  # rows unlike the last (background)
        height = min(len(pixels), int(used[-1]) + 1 + margin) if len(used) else len(pixels)
        image.crop((0, 0, pixels.shape[1], height)).save(png)
    return height


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=Path("../shared"))
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--key", type=int, default=0)
    parser.add_argument(
        "--work", type=Path, required=True, help="Where the poisoned copy and the scan go (large: not for reports/)."
    )
    parser.add_argument(
        "--large-scan", type=Path, default=None, help="A finished scan of many images whose report size to measure."
    )
    parser.add_argument("--height", type=int, default=2600, help="Screenshot height in pixels.")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    data = args.shared / "data" / "cifar10"
    harness = Harness(
        data / "cifar10_train.npz",
        data / "cifar10_test.npz",
        args.cache,
        EvaluationConfig(scale="cpu", cache=str(args.cache)),
        progress=False,
    )
    setup = choose_setup(args.key, harness.train, harness.test, harness.config.budget)
    if not harness.poisons_path(setup).exists():
        raise SystemExit(f"key {args.key}: no cached poisons in {args.cache}; run sanitize evaluate first")
    poisons = harness.poisons(setup, None)
    poisoned = harness.data_for("undefended", poisons)
    harness.filtered(poisoned, "scan", setup)  # the scan arm's proxy (cached after the first run)
    proxy = harness.scan_dir(poisoned) / "knn_density" / "proxy" / "model.pt"
    copy = args.work / "poisoned"
    if not (copy / "poison_manifest.json").exists():
        write_poisoned(harness.train, poisons, copy, target_image=harness.test.load_image(setup.target_index))
    result = scan(copy / "data.npz", args.work / "scan", checkpoint=str(proxy), manifest=str(copy), quiet=True)
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(result.files["report"], args.out / "report.html")
    screenshot(args.out / "report.html", args.out / "report.png", args.work / "chromium-profile", args.height)
    fit_to_content(args.out / "report.png")
    sizes = {"sample_report_kib": round((args.out / "report.html").stat().st_size / 1024, 1)}
    if args.large_scan:
        large = write_report(args.large_scan)
        examples = json.loads((args.large_scan / "summary.json").read_text())["data"]["examples"]
        sizes |= {"large_scan_examples": examples, "large_scan_report_kib": round(large.stat().st_size / 1024, 1)}
    poisons_summary = {k: v for k, v in result.summary["poisons"].items() if k != "ids"}
    record = {
        "command": "python " + " ".join(sys.argv),
        "key": args.key,
        "flagged": result.summary["flagged"],
        "poisons": poisons_summary,
        **sizes,
    }
    (args.out / "results.json").write_text(json.dumps(record, indent=1))
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
