"""The committed evaluations re-aggregate from their committed rows to the numbers their summaries state: rows written
by every older version still read, pair and aggregate the same."""

import json
import shutil
from pathlib import Path

import pytest

from attacks.summary import aggregate

REPORTS = Path(__file__).resolve().parents[2] / "reports"
COMMITTED = sorted(p.parent for p in REPORTS.glob("**/results.jsonl") if (p.parent / "summary.json").exists())


def _entries_by_group(entries):
    keys = ("attack", "scale", "model", "epochs", "eps", "arm", "variant")
    return {tuple(e.get(k) for k in keys): e for e in entries}


@pytest.mark.parametrize("folder", COMMITTED, ids=[str(p.relative_to(REPORTS)) for p in COMMITTED])
def test_committed_summary_is_reproduced_from_its_rows(tmp_path, folder):
    shutil.copy(folder / "results.jsonl", tmp_path / "results.jsonl")
    fresh = aggregate(tmp_path)
    committed = json.loads((folder / "summary.json").read_text())
    for part in ("table", "paired"):
        if part not in committed:  # summaries from before pairing existed
            continue
        assert len(fresh[part]) == len(committed[part]), part
        for old, new in zip(committed[part], fresh[part]):
            # summaries from older versions lack later columns; every number they state must come out the same
            assert {k: new.get(k) for k in old if k in new or old[k] is not None} == {
                k: old[k] for k in old if k in new or old[k] is not None
            }, (part, old.get("arm"))


def test_the_committed_evaluations_are_found():
    assert any(p.name == "gradient-matching-cpu" for p in COMMITTED)
