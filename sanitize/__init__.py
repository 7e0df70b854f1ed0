"""sanitize: find and drop targeted clean-label poisons in image-classification training data.

`sanitize.scan(data, out, **options)` and `sanitize.train(data, out, robust=True, **options)` are the two runs, with
the CLI's options and defaults; their results are `ScanResult` and `TrainResult`. `sanitize.combine_scans(scans, out)`
reads finished scans of one dataset as one gate. Imported on first use, so that
`import sanitize` (and the CLI's help) does not load torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "scan": "sanitize.scanner",
    "ScanResult": "sanitize.scanner",
    "train": "sanitize.trainer",
    "TrainResult": "sanitize.trainer",
    "combine_scans": "sanitize.combine",
    "CombinedResult": "sanitize.combine",
    "finetune": "sanitize.finetuner",
    "FineTuneConfig": "sanitize.config",
    "ScanConfig": "sanitize.config",
    "FitConfig": "sanitize.config",
    "TrainConfig": "sanitize.config",
    "DataError": "sanitize.errors",
    "SanitizeError": "sanitize.errors",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sanitize' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = [*sorted(_EXPORTS), "__version__"]
