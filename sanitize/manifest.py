"""Ground truth for audits: the poison manifest an attack writes beside a poisoned copy, and flags scored against it.

The manifest is the contract between `attacks` (which writes it) and the product (which only reads it): method, eps,
target and intended class, and the ids of the poisoned examples as the poisoned copy names them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

from sanitize.errors import SanitizeError

MANIFEST = "poison_manifest.json"
TARGET_IMAGE = "target.png"  # the attack's target, written losslessly beside the manifest
REQUIRED = {"method", "eps", "target_class", "intended_class", "poison_ids"}
MAX_MANIFEST_BYTES = 64 * 2**20


def manifest_file(path: str | Path) -> Path:
    """The manifest file itself, given it or the folder holding it."""
    path = Path(path)
    return path / MANIFEST if path.is_dir() else path


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Read a poison manifest (the file, or the folder holding it), with a clear error for anything that is not one."""
    path = manifest_file(path)
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise ValueError(f"larger than {MAX_MANIFEST_BYTES // 2**20} MiB")
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise SanitizeError(f"cannot read poison manifest {path}: {error}") from None
    except RecursionError:
        raise SanitizeError(f"cannot read poison manifest {path}: nested too deeply") from None
    if not isinstance(record, dict) or not REQUIRED <= set(record) or not isinstance(record["poison_ids"], list):
        raise SanitizeError(f"{path} is not a poison manifest (needs {', '.join(sorted(REQUIRED))}, poison_ids a list)")
    if not all(isinstance(i, (str, int)) and not isinstance(i, bool) for i in record["poison_ids"]):
        raise SanitizeError(f"{path}: poison_ids must be strings or integers")
    positions = record.get("poison_indices", [])
    if not isinstance(positions, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in positions
    ):
        raise SanitizeError(f"{path}: poison_indices must be a list of non-negative integers")
    return record


def poison_mask(record: dict[str, Any], ids: Sequence[str]) -> np.ndarray:
    """Boolean mask over the dataset's positions: True where the manifest names the example as a poison."""
    position = {id_: i for i, id_ in enumerate(ids)}
    named = [str(id_) for id_ in record["poison_ids"]]
    missing = [id_ for id_ in named if id_ not in position]
    if missing:
        raise SanitizeError(
            f"{len(missing)} of the manifest's {len(named)} poison ids are not in the data (first: {missing[0]!r}); "
            "was the manifest written for this dataset?"
        )
    outside = [i for i in record.get("poison_indices", []) if i >= len(ids)]
    if outside:
        raise SanitizeError(
            f"the manifest's poison_indices go up to {max(outside)} but the data has {len(ids)} examples"
        )
    mask = np.zeros(len(ids), dtype=bool)
    mask[[position[id_] for id_ in named]] = True
    return mask


def flag_metrics(flags: np.ndarray, scores: np.ndarray | None, truth: np.ndarray) -> dict[str, Any]:
    """Dropped fraction, and precision / recall of the flags and AUROC of the scores against the true poisons."""
    has_both = scores is not None and 0 < truth.sum() < len(truth)
    return {
        "dropped_fraction": float(flags.mean()),
        "poison_precision": float((flags & truth).sum() / flags.sum()) if flags.any() else None,
        "poison_recall": float((flags & truth).sum() / truth.sum()) if truth.any() else None,
        "auroc": float(roc_auc_score(truth, scores)) if has_both else None,
    }
