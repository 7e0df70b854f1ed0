"""Apply reports/gradient-matching-full-tuning/TUNING-RULE.md to the sweep's rows: which knn_density variant, proxy
and z cut-off the full scale's scan should use, chosen on the tuning keys and the clean set only.

    python benchmarks/choose_rule.py reports/gradient-matching-full-tuning/detection --keys 100,101

Writes DIR/choice.md: every candidate with its clean flags and alarm, and per key the gate, the flagged fraction and
the recall among the carriers and among all poisons; admissible ones ranked by the rule, the chosen one (if any) first.
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
    args = parser.parse_args()
    keys = [int(k) for k in args.keys.split(",")]
    rows = [json.loads(line) for line in (args.directory / "detection.jsonl").read_text().splitlines()]
    found = sorted(candidates(rows, keys), key=lambda c: (c["admissible"], *rank(c)), reverse=True)
    best = found[0] if found and found[0]["admissible"] else None
    chosen = best if best and min(k["carriers"] for k in best["keys"]) >= MIN_CARRIER_RECALL else None
    lines = [
        "# The full-scale rule, chosen by TUNING-RULE.md on tuning keys " + ", ".join(map(str, keys)),
        "",
        f"Command: `python benchmarks/choose_rule.py {args.directory} --keys {args.keys}`",
        "",
        f"**Chosen**: {describe(chosen)}"
        if chosen
        else "**Chosen: none.** "
        + (
            f"The best admissible candidate ({describe(best)}) catches fewer than half of a key's carriers."
            if best
            else "No candidate is admissible (clean flags <= 2% and no clean alarm, and the gate failing on every key)."
        ),
        "",
        "| proxy | options (knn_density) | cut | clean flagged | clean alarm | "
        + " | ".join(f"key {k}: gate, flagged, carriers, poisons" for k in keys)
        + " | admissible |",
        "|" + " --- |" * (6 + len(keys)),
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
            + f" | {'yes' if c['admissible'] else 'no'} |"
        )
    (args.directory / "choice.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:6]))


def describe(candidate: dict) -> str:
    return f"proxy {candidate['proxy']}, {json.dumps(candidate['options'])}, cut {candidate['cut']}"


if __name__ == "__main__":
    main()
