"""Where a benchmark ran, written beside what it measured: each results file names its machine and how busy it was."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch


def write_results(path: Path, result: dict) -> None:
    """`result` with the machine and the load average at the end, as JSON at `path` (and on stdout)."""
    result = result | {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
        },
        "load_average_at_end": os.getloadavg(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
