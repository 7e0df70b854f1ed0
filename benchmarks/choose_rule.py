"""Apply reports/gradient-matching-full-tuning/TUNING-RULE.md to the sweep's rows: which knn_density variant, proxy
and z cut-off the full scale's scan should use, chosen on the tuning keys and the clean set only.

    python benchmarks/choose_rule.py reports/gradient-matching-full-tuning/detection --keys 100,101

Writes DIR/choice.md: every candidate with its clean flags and alarm, and per key the gate, the flagged fraction and
the recall among the carriers and among all poisons; admissible ones ranked by the rule, the chosen one (if any) first.
With --clean-corpus [PROXY=]DIR an otherwise admissible candidate must also raise no class alarm on any of the class
alarm's clean scans made with its proxy (reports/class-alarm), the gate's standing promise; a candidate whose proxy has
no such corpus is marked unchecked.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

CUTS = ("default", "3.0", "2.5")  # the rule's z 3.5 (with its second pass), and the sweep's lower cut-offs
MAX_CLEAN_FLAGGED = 0.02
GATE_FRACTION = 0.05
MIN_CARRIER_RECALL = 0.5


def at_cut(row: dict, cut: str, key: str) -> float:
    """A row's metric at a cut-off: flagged fraction, poison recall or carrier recall."""
    if cut == "default":
        return {
            "flagged": row["dropped_fraction"],
            "recall": row.get("poison_recall"),
            "carriers": row.get("recall_carriers"),
        }[key]
    if row["key"] == "clean":
        return row["dropped_at_z"][cut]
    values = row["at_z"][cut]
    return {
        "flagged": values["dropped_fraction"],
        "recall": values["poison_recall"],
        "carriers": values["recall_carriers"],
    }[key]


def candidates(rows: list[dict], keys: list[int]) -> list[dict]:
    by = {}
    for r in rows:
        if r["detector"] != "knn_density":
            continue
        by[(r.get("proxy_model", "auto"), json.dumps(r["options"], sort_keys=True), r["key"])] = r
    out = []
    for (proxy, options, key), clean in by.items():
        if key != "clean" or "dropped_at_z" not in clean:
            continue
        poisoned = [by.get((proxy, options, k)) for k in keys]
        if None in poisoned or any("at_z" not in r or "alarmed_classes" not in r for r in poisoned):
            continue
        for cut in CUTS:
            per_key = [
                {
                    "key": r["key"],
                    "flagged": at_cut(r, cut, "flagged"),
                    "alarm": bool(r["alarmed_classes"]),
                    "carriers": at_cut(r, cut, "carriers"),
                    "recall": at_cut(r, cut, "recall"),
                }
                for r in poisoned
            ]
            for k in per_key:
                k["gate_fails"] = k["alarm"] or k["flagged"] > GATE_FRACTION
            clean_flagged = at_cut(clean, cut, "flagged")
            out.append(
                {
                    "proxy": proxy,
                    "options": json.loads(options),
                    "cut": cut,
                    "clean_flagged": clean_flagged,
                    "clean_alarm": bool(clean["alarmed_classes"]),
                    "keys": per_key,
                    "admissible": not clean["alarmed_classes"]
                    and clean_flagged <= MAX_CLEAN_FLAGGED
                    and all(k["gate_fails"] for k in per_key),
                }
            )
    return out


def corpus_false_alarms(options: dict, corpus: Path) -> list[str]:
    """The clean scans of the class alarm's corpus (reports/class-alarm; WORK/scans/NAME with the default proxy's
    embeddings) on which knn_density with `options` raises a class alarm."""
    from sanitize.detectors import DetectorContext, run_detector
    from sanitize.detectors.knn_density import KnnDensityOptions
    from sanitize.embeddings import load_embeddings
    from sanitize.report import read_scores

    alarmed = []
    for scan in sorted(d for d in corpus.iterdir() if (d / "embeddings" / "meta.json").exists()):
        detection = run_detector(
            "knn_density",
            load_embeddings(scan / "embeddings", read_scores(scan / "scores.csv").labels),
            KnnDensityOptions(**options),
            DetectorContext(progress=False),
        )
        if any(info.get("alarmed") for info in detection.summary["per_class"].values()):
            alarmed.append(scan.name)
    return alarmed


def rank(candidate: dict) -> tuple:
    """The rule's order: the smaller carrier recall over the keys, then the smaller poison recall, then fewer clean
    flags, then the default proxy."""
    return (
        min(k["carriers"] for k in candidate["keys"]),
        min(k["recall"] for k in candidate["keys"]),
        -candidate["clean_flagged"],
        candidate["proxy"] == "auto",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", type=Path)
    parser.add_argument("--keys", default="100,101")
    parser.add_argument(
        "--clean-corpus",
        action="append",
        default=[],
        metavar="[PROXY=]DIR",
        help="The class alarm's clean scans with a proxy (default auto; e.g. work-data/class-alarm/scans): an "
        "admissible candidate on that proxy must raise no alarm on any (repeatable, one per proxy).",
    )
    args = parser.parse_args()
    keys = [int(k) for k in args.keys.split(",")]
    rows = [json.loads(line) for line in (args.directory / "detection.jsonl").read_text().splitlines()]
    found = candidates(rows, keys)
    corpora = {
        proxy if sep else "auto": Path(directory if sep else proxy)
        for proxy, sep, directory in (text.partition("=") for text in args.clean_corpus)
    }
    checked: dict[str, list[str]] = {}  # the alarm does not depend on the cut: each proxy and options once
    for c in found:  # the gate's standing promise: no class alarm on the clean corpus of the candidate's proxy
        c["corpus"] = None
        if c["admissible"] and corpora:
            if c["proxy"] in corpora:
                identity = json.dumps([c["proxy"], c["options"]], sort_keys=True)
                if identity not in checked:
                    checked[identity] = corpus_false_alarms(c["options"], corpora[c["proxy"]])
                c["corpus"] = checked[identity]
                c["admissible"] = not c["corpus"]
            else:
                c["corpus"] = "unchecked"  # no corpus scanned with this proxy
    found = sorted(found, key=lambda c: (c["admissible"], *rank(c)), reverse=True)
    best = found[0] if found and found[0]["admissible"] else None
    chosen = best if best and min(k["carriers"] for k in best["keys"]) >= MIN_CARRIER_RECALL else None
    pending = (
        " **Pending**: the clean corpus has not been scanned with this proxy; the choice stands only if it raises no"
        " class alarm there."
        if chosen and chosen["corpus"] == "unchecked"
        else ""
    )
    corpus = "".join(f" --clean-corpus {text}" for text in args.clean_corpus)
    lines = [
        "# The full-scale rule, chosen by TUNING-RULE.md on tuning keys " + ", ".join(map(str, keys)),
        "",
        f"Command: `python benchmarks/choose_rule.py {args.directory} --keys {args.keys}{corpus}`",
        "",
        f"**Chosen**: {describe(chosen)}.{pending}"
        if chosen
        else "**Chosen: none.** "
        + (
            f"The best admissible candidate ({describe(best)}) catches fewer than half of a key's carriers."
            if best
            else "No candidate is admissible (at most 2% of the clean set flagged, no class alarm there nor, with"
            " --clean-corpus, on the clean corpus, and the gate failing on every key)."
        ),
        "",
        "| proxy | options (knn_density) | cut | clean flagged | clean alarm | "
        + " | ".join(f"key {k}: gate, flagged, carriers, poisons" for k in keys)
        + " | clean corpus: false alarms | admissible |",
        "|" + " --- |" * (7 + len(keys)),
    ]
    for c in found:
        cells = [
            f"{'fails' if k['gate_fails'] else 'passes'}, {k['flagged']:.2%}, {k['carriers']:.2f}, {k['recall']:.2f}"
            for k in c["keys"]
        ]
        lines.append(
            f"| {c['proxy']} | {json.dumps(c['options'])} | {c['cut']} | {c['clean_flagged']:.2%} | "
            f"{'yes' if c['clean_alarm'] else 'no'} | "
            + " | ".join(cells)
            + f" | {corpus_cell(c['corpus'])} | {'yes' if c['admissible'] else 'no'} |"
        )
    (args.directory / "choice.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:6]))


def corpus_cell(alarms: list[str] | str | None) -> str:
    if alarms is None or isinstance(alarms, str):
        return alarms or "-"
    return f"{len(alarms)} ({', '.join(alarms)})" if alarms else "0"


def describe(candidate: dict) -> str:
    return f"proxy {candidate['proxy']}, {json.dumps(candidate['options'])}, cut {candidate['cut']}"


if __name__ == "__main__":
    main()
