"""The benchmark scripts import one another as scripts (benchmarks/ on the path), so their tests do too."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
