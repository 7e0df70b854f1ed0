"""Finished scans of one dataset, read as one gate: it fails when any scan's gate fails, and the union of their flags
is what to leave out. Proxies of different architectures see different things: an attacker who crafts poisons to
pass one proxy's scan is caught by another's (reports/adaptive-attack), so a gate that needs every scan to pass makes
the attacker imitate them all.

Writes OUT/summary.json (`kind` "combined-scan": each scan's verdict and the combined one), OUT/flagged.txt (the
union, one id a line, for `sanitize train --exclude`) and OUT/report.html (the combined verdict, each scan linked to
its own report). Scans are only read.
"""

from __future__ import annotations

import datetime
import json
import os
import shlex
import sys
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sanitize
from sanitize.data import write_atomic
from sanitize.errors import SanitizeError
from sanitize.report import REPORT, remove_earlier_verdict, write_report


@dataclass
class CombinedResult:
    """The combined summary (written to summary.json), the union of the flagged ids and the files."""

    summary: dict[str, Any]
    flagged_ids: list[str]
    files: dict[str, Path]

    @property
    def passed(self) -> bool:
        return self.summary["gate"]["passed"]


MAX_SUMMARY_BYTES = 64 << 20  # a scan's summary.json is kilobytes; ImageNet's 1,000 classes make it a few MiB
MAX_ID_BYTES = 4096  # an id is a path relative to DATA


def read_scan(folder: Path) -> tuple[dict[str, Any], list[str]]:
    """A finished scan's summary and flagged ids; a one-line error for anything else (files too large for what a
    scan writes included, so a hostile folder cannot exhaust memory)."""
    try:
        if (folder / "summary.json").stat().st_size > MAX_SUMMARY_BYTES:
            raise SanitizeError(f"{folder}/summary.json is larger than a scan writes")
        summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
        if summary["kind"] != "scan":
            raise TypeError
        gate = summary["gate"]
        gate.setdefault("verdict", "passed" if gate["passed"] else "failed")  # summaries from before verdicts
        if gate["verdict"] not in ("passed", "failed", "inconclusive"):
            raise ValueError
        gate["alarmed_classes"] = [str(c) for c in gate["alarmed_classes"]]
        gate["flagged_fraction"] = float(gate["flagged_fraction"])
        data, model = summary["data"], summary["model"]
        data["source"], data["fingerprint"], model["name"] = (
            str(data["source"]),
            str(data["fingerprint"]),
            str(model["name"]),
        )
        model["checkpoint"] = None if model.get("checkpoint") is None else str(model["checkpoint"])
        options = summary.setdefault("config", {}).setdefault("options", {})
        if options.get("closed_group_conductance") is not None:  # knn_density's; other detectors have none
            options["closed_group_conductance"] = float(options["closed_group_conductance"])
        examples = data["examples"] = int(data["examples"])
        if (folder / "flagged.txt").stat().st_size > MAX_ID_BYTES * examples:
            raise SanitizeError(f"{folder}/flagged.txt holds more than {examples} ids")
        flagged = (folder / "flagged.txt").read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        reason = getattr(error, "strerror", None) or type(error).__name__
        raise SanitizeError(f"{folder} is not a finished scan (summary.json, flagged.txt): {reason}") from None
    except (AttributeError, KeyError, TypeError, ValueError):
        raise SanitizeError(f"{folder} is not a finished scan: its summary.json is not a scan's") from None
    if len(flagged) > examples:
        raise SanitizeError(f"{folder}/flagged.txt holds more than {examples} ids")
    return summary, flagged


def combined_gate(gates: list[dict[str, Any]], flagged_fraction: float) -> dict[str, Any]:
    """Failed if any scan failed; else no verdict (inconclusive) if any has none; else passed."""
    verdicts = [g["verdict"] for g in gates]
    verdict = "failed" if "failed" in verdicts else "inconclusive" if "inconclusive" in verdicts else "passed"
    return {
        "verdict": verdict,
        "flagged_fraction": flagged_fraction,
        "alarmed_classes": sorted({c for g in gates for c in g["alarmed_classes"]}),
        "passed": verdict == "passed",
    }


def report_link(scan: Path, out: Path) -> str | None:
    """The scan's report.html as a link from OUT/report.html (relative, so that both folders can move together;
    "./" first, so that no folder name reads as a URL scheme), or None where it has none."""
    report = scan / REPORT
    if not report.is_file():
        return None
    try:
        relative = os.path.relpath(report.resolve(), out.resolve())
    except ValueError:  # another drive: no relative path
        return None
    return "./" + urllib.parse.quote(Path(relative).as_posix())


def shared_proxies(scans: list[dict[str, Any]]) -> list[str]:
    """A note for each architecture that more than one scan trained from scratch: poisons crafted against one such
    proxy passed the gate of another seed's too (reports/adaptive-attack), so they are one view, not several."""
    trained: dict[str, list[str]] = {}
    for each in scans:
        if each["checkpoint"] is None:
            trained.setdefault(each["proxy"], []).append(each["folder"])
    return [
        f"{', '.join(folders)} train the same proxy architecture ({proxy}): one view of the data (poisons crafted "
        "against it passed its gate under another seed too); combine proxies of different architectures"
        for proxy, folders in trained.items()
        if len(folders) > 1
    ]


def combine_scans(scans: Sequence[str | os.PathLike], out: str | os.PathLike) -> CombinedResult:
    """Read the finished scans in `scans` (two or more, of the same data) as one gate and write it to `out`."""
    folders, out = [Path(s) for s in scans], Path(out)
    if len(folders) < 2:
        raise SanitizeError("combine needs at least two scans")
    if any(out.resolve() == f.resolve() for f in folders):
        raise SanitizeError(f"--out {out} is one of the scans: it would overwrite that scan's summary")
    try:
        out.mkdir(parents=True, exist_ok=True)
        remove_earlier_verdict(out)  # an error or a crash below leaves no verdict behind
    except OSError as error:
        raise SanitizeError(f"cannot write the output folder {out}: {error.strerror or error}") from None
    read = [read_scan(f) for f in folders]
    if len({s["data"]["fingerprint"] for s, _ in read}) > 1:
        raise SanitizeError("the scans are of different data (their fingerprints differ)")
    union = list(dict.fromkeys(i for _, flagged in read for i in flagged))
    by_every_scan = set.intersection(*(set(flagged) for _, flagged in read))
    data = read[0][0]["data"]
    fraction = len(union) / data["examples"] if data["examples"] else 0.0
    summary = {
        "kind": "combined-scan",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(sys.argv),
        "version": sanitize.__version__,
        "data": {k: data[k] for k in ("source", "fingerprint", "examples")},
        "scans": [
            {
                "folder": str(f),
                "proxy": s["model"]["name"],
                "checkpoint": s["model"]["checkpoint"],
                "closed_group_conductance": s["config"]["options"].get("closed_group_conductance"),
                "verdict": s["gate"]["verdict"],
                "flagged_fraction": s["gate"]["flagged_fraction"],
                "alarmed_classes": s["gate"]["alarmed_classes"],
                "report": report_link(f, out),
            }
            for f, (s, _) in zip(folders, read)
        ],
        "flagged": {"count": len(union), "fraction": fraction, "by_every_scan": len(by_every_scan)},
        "gate": combined_gate([s["gate"] for s, _ in read], fraction),
    }
    summary["notes"] = shared_proxies(summary["scans"])
    files = {"flagged": out / "flagged.txt", "report": out / REPORT, "summary": out / "summary.json"}
    write_atomic(files["flagged"], "".join(f"{i}\n" for i in union))
    write_report(out, summary=summary)
    write_atomic(files["summary"], json.dumps(summary, indent=2))  # last: its presence means the run finished
    return CombinedResult(summary, union, files)
