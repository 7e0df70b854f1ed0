"""How long `sanitize --help`, `--version` and a usage error take, as a ratio to a bare `python -c pass` start.

    python benchmarks/cli_latency.py --repeats 5 --out reports/cli-latency

The CLI imports torch, faiss and scikit-learn only inside the commands that need them, so help and argument errors
should cost about an interpreter start plus click. Best of the interleaved repeats; results.json and README.md in OUT.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

CASES = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "sanitize --help": [sys.executable, "-m", "sanitize", "--help"],
    "sanitize --version": [sys.executable, "-m", "sanitize", "--version"],
    "sanitize scan --help": [sys.executable, "-m", "sanitize", "scan", "--help"],
    "sanitize scan (usage error)": [sys.executable, "-m", "sanitize", "scan"],
    "import torch (for scale)": [sys.executable, "-c", "import torch"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("reports/cli-latency"))
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in CASES}
    for _ in range(args.repeats):  # interleaved, so drift in machine load hits every case alike
        for name, command in CASES.items():
            started = time.perf_counter()
            subprocess.run(command, capture_output=True)
            times[name].append(time.perf_counter() - started)
    base = min(times["python -c pass"])
    best = {name: min(values) for name, values in times.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    command = f"python benchmarks/cli_latency.py --repeats {args.repeats} --out {args.out}"
    results = {"command": command, "machine": {"platform": platform.platform()}, "seconds": times, "best": best}
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    rows = "\n".join(f"| {name} | {best[name]:.3f} | {best[name] / base:.1f}x |" for name in CASES)
    (args.out / "README.md").write_text(
        f"# CLI start-up: help, version and usage errors\n\n**Result:** `sanitize --help` takes "
        f"{best['sanitize --help'] / base:.1f}x a bare Python start ({best['sanitize --help']:.2f} s); importing torch "
        f"alone takes {best['import torch (for scale)'] / base:.0f}x.\n\nCommand: `{command}` (best of {args.repeats} "
        f"interleaved repeats)\n\n| case | seconds | vs python -c pass |\n| --- | --- | --- |\n{rows}\n"
    )


if __name__ == "__main__":
    main()
