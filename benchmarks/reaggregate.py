"""Rewrite an evaluation's summary.json, summary.md and report.html from its results.jsonl, keeping the command the
summary names: for committing rows while an evaluation that aggregates only at its end still runs.

    python benchmarks/reaggregate.py reports/gradient-matching-pilot/no-augmentation [...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from attacks.summary import aggregate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path)
    for folder in parser.parse_args().folders:
        if (folder / "results.jsonl").exists():
            aggregate(folder)


if __name__ == "__main__":
    main()
