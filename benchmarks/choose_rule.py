"""Apply reports/gradient-matching-full-tuning/TUNING-RULE.md to the sweep's rows: which knn_density variant, proxy
and z cut-off the full scale's scan should use, chosen on the tuning keys and the clean set only.

    python benchmarks/choose_rule.py reports/gradient-matching-full-tuning/detection --keys 100,101

Writes DIR/choice.md: every candidate with its clean flags and alarm, and per key the gate, the flagged fraction and
the recall among the carriers and among all poisons; admissible ones ranked by the rule, the chosen one (if any) first.
With --clean-corpus [PROXY=]DIR an otherwise admissible candidate must also raise no class alarm on any of the class
alarm's clean scans made with its proxy (reports/class-alarm), the gate's standing promise, checked in the rule's
order until one keeps it (the ones below it are not needed); a candidate whose proxy has no such corpus is marked
unchecked. Each verdict is kept in DIR/corpus.jsonl (the scans are work files), and a later run without that proxy's
corpus reads it from there. Rows that name no proxy were scanned with the ConvNet (`convnet`).
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
        by[(r.get("proxy_model", "convnet"), json.dumps(r["options"], sort_keys=True), r["key"])] = r
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


def read_verdicts(path: Path) -> dict[str, dict]:
    """Corpus verdicts by json [proxy, options]: the scans checked and those with a false alarm."""
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return {json.dumps([r["proxy"], r["options"]], sort_keys=True): r for r in rows}


def write_verdicts(path: Path, verdicts: dict[str, dict]) -> None:
    path.write_text("".join(json.dumps(v, sort_keys=True) + "\n" for v in verdicts.values()))


def corpus_false_alarms(options: dict, corpus: Path) -> tuple[int, list[str]]:
    """How many clean scans of the class alarm's corpus (reports/class-alarm; WORK/scans/NAME with one proxy's
    embeddings) there are, and those on which knn_density with `options` raises a class alarm."""
    from sanitize.detectors import DetectorContext, run_detector
    from sanitize.detectors.knn_density import KnnDensityOptions
    from sanitize.embeddings import load_embeddings
    from sanitize.report import read_scores

    alarmed = []
    scans = sorted(d for d in corpus.iterdir() if (d / "embeddings" / "meta.json").exists())
    for scan in scans:
        detection = run_detector(
            "knn_density",
            load_embeddings(scan / "embeddings", read_scores(scan / "scores.csv").labels),
            KnnDensityOptions(**options),
            DetectorContext(progress=False),
        )
        if any(info.get("alarmed") for info in detection.summary["per_class"].values()):
            alarmed.append(scan.name)
    return len(scans), alarmed


def rank(candidate: dict) -> tuple:
    """The rule's order: the smaller carrier recall over the keys, then the smaller poison recall, then fewer clean
    flags, then the ConvNet proxy (the cheaper one, and the default when the rule was written)."""
    return (
        min(k["carriers"] for k in candidate["keys"]),
        min(k["recall"] for k in candidate["keys"]),
        -candidate["clean_flagged"],
        candidate["proxy"] == "convnet",
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
        help="The class alarm's clean scans with a proxy (default convnet; e.g. work-data/class-alarm/scans): an "
        "admissible candidate on that proxy must raise no alarm on any (repeatable, one per proxy).",
    )
    args = parser.parse_args()
    keys = [int(k) for k in args.keys.split(",")]
    rows = [json.loads(line) for line in (args.directory / "detection.jsonl").read_text().splitlines()]
    found = candidates(rows, keys)
    corpora = {
        proxy if sep else "convnet": Path(directory if sep else proxy)
        for proxy, sep, directory in (text.partition("=") for text in args.clean_corpus)
    }
    checked: set[str] = set()
    # the alarm does not depend on the cut: each proxy and options once. Verdicts are kept in DIR/corpus.jsonl, so
    # a later run without that proxy's corpus (scans are work files) reads the verdict it reached
    verdicts_path = args.directory / "corpus.jsonl"
    verdicts = read_verdicts(verdicts_path)
    # the gate's standing promise, in the rule's order: no class alarm on the clean corpus of the candidate's proxy;
    # the first admissible candidate that keeps it is chosen, so the ones ranked below it need no check
    found = sorted(found, key=rank, reverse=True)
    settled = False
    for c in found:
        c["corpus"] = None
        if not c["admissible"] or not (corpora or verdicts):
            continue
        identity = json.dumps([c["proxy"], c["options"]], sort_keys=True)
        if settled:
            c["corpus"] = "not needed (ranked below the chosen)"
            continue
        if c["proxy"] in corpora and identity not in checked:
            directory = corpora[c["proxy"]]
            scans, alarms = corpus_false_alarms(c["options"], directory)
            verdicts[identity] = {"proxy": c["proxy"], "options": c["options"], "scans": scans, "false_alarms": alarms}
            write_verdicts(verdicts_path, verdicts)
            checked.add(identity)
        if identity in verdicts:
            c["corpus"] = verdicts[identity]
            c["admissible"] = settled = not c["corpus"]["false_alarms"]
        else:
            c["corpus"] = "unchecked"  # no corpus scanned with this proxy
            settled = True
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


def corpus_cell(verdict: dict | str | None) -> str:
    if verdict is None or isinstance(verdict, str):
        return verdict or "-"
    alarms = verdict["false_alarms"]
    named = f" ({', '.join(alarms)})" if alarms else ""
    return f"{len(alarms)} of {verdict['scans']}{named}" + (f", {verdict['source']}" if "source" in verdict else "")


def describe(candidate: dict) -> str:
    return f"proxy {candidate['proxy']}, {json.dumps(candidate['options'])}, cut {candidate['cut']}"


if __name__ == "__main__":
    main()
