"""The HTML audit report: one self-contained file a data owner opens offline and decides from.

`write_report(run_dir)` renders `report.html` from what a run left in its folder: a scan (summary.json with a gate,
scores.csv, embeddings/), a training run (summary.json, drop_log.json) or an evaluation (summary.json with a table).
Everything is inline: CSS and a little JS under a Content-Security-Policy that allows only their hashes, charts as SVG,
thumbnails as PNG data URIs. Everything that comes from the data (file names, class names, paths) goes through
jinja2's autoescaping. Thumbnails are capped (`max_thumbnails`); scores.csv holds every example.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import torch
from PIL import Image
from sklearn.decomposition import PCA

from sanitize.data import ImageDataset, open_dataset, write_atomic
from sanitize.density import softmax
from sanitize.detectors.knn_density import FLAG_REASONS
from sanitize.errors import SanitizeError
from sanitize.manifest import TARGET_IMAGE

REPORT = "report.html"
THUMBNAIL_SIDE = 64  # larger images are shrunk to this many pixels on their long side
HISTOGRAM_BINS = 20
HISTOGRAM_WIDTH, HISTOGRAM_HEIGHT = 200, 48  # the plot area of a per-class histogram, in SVG units (axis below it)
PROJECTION_POINTS = 400  # unflagged points drawn per class; every flagged one is drawn too (up to the thumbnail cap)
PLOT_SIZE = 320
SWEEP_WIDTH, SWEEP_HEIGHT = 360, 150  # the plot area of success against the adaptive attacker's weight, in SVG units
SWEEP_STYLES = 4  # dash styles of its lines (sweep.css: .s0 ... .s3), repeated beyond
SWEEP_FILE_PREFIX = "success-vs-weight-"  # its standalone SVGs beside an evaluation's report.html
SWEEP_SLUG_LENGTH = 120  # characters of the chart's title kept in the file name

_ENVIRONMENT = jinja2.Environment(
    loader=jinja2.PackageLoader("sanitize", "templates"),
    autoescape=True,
    undefined=jinja2.ChainableUndefined,  # older runs lack newer fields: blank, not a crash
    trim_blocks=True,
    lstrip_blocks=True,
)


@dataclass
class ScoreTable:
    """scores.csv as arrays (rows follow dataset positions)."""

    ids: list[str]
    paths: list[str]
    labels: np.ndarray
    scores: np.ndarray
    flags: np.ndarray


def write_report(
    run_dir: str | os.PathLike,
    data: str | os.PathLike | ImageDataset | None = None,
    max_thumbnails: int = 48,
    max_projection_classes: int = 10,
    summary: dict[str, Any] | None = None,
) -> Path:
    """Render RUN_DIR/report.html from the run's outputs (a scan's, `sanitize combine`'s, a training run's or an
    evaluation's). `data` gives the images for thumbnails (default: the source recorded in summary.json; a dataset
    whose fingerprint differs is not used). A run passes its `summary` before writing summary.json, so that the
    verdict is the last file it writes."""
    run_dir = Path(run_dir)
    if max_thumbnails < 0 or max_projection_classes < 0:
        raise SanitizeError("max_thumbnails and max_projection_classes must be >= 0")
    summary = summary if summary is not None else _read_json(run_dir / "summary.json")
    if summary.get("kind") == "combined-scan":
        context = {"kind": "combined", "title": "sanitize combine", "summary": summary}
    elif "table" in summary:
        charts = [sweep_chart(setting, lines) for setting, lines in _by_setting(summary.get("weight_sweeps") or [])]
        write_sweep_charts(run_dir, charts)
        context = {"kind": "evaluation", "title": "sanitize evaluation", "evaluation": summary, "sweep_charts": charts}
    elif "gate" in summary:
        context = _scan_context(run_dir, summary, data, max_thumbnails, max_projection_classes)
    elif "robust" in summary:
        context = _train_context(run_dir, summary, data, max_thumbnails)
    else:
        raise SanitizeError(
            f"{run_dir / 'summary.json'} is not the summary of a scan, combined scans, training run or evaluation"
        )
    path = run_dir / REPORT
    write_atomic(path, render(context))
    return path


def remove_earlier_verdict(run_dir: Path) -> None:
    """An earlier run's summary.json and its report.html, so that a run failing before it writes its own leaves
    neither behind."""
    for name in ("summary.json", REPORT):
        (run_dir / name).unlink(missing_ok=True)


def render(context: dict[str, Any]) -> str:
    """The report's HTML for `context`, with the inline CSS and JS admitted by their hashes in the CSP."""
    css, js = _asset("report.css") + _asset("sweep.css"), _asset("report.js")
    csp = (
        f"default-src 'none'; img-src data:; style-src '{_csp_hash(css)}'; script-src '{_csp_hash(js)}'; "
        "base-uri 'none'; form-action 'none'"
    )
    return _ENVIRONMENT.get_template("report.html.j2").render(csp=csp, css=css, js=js, **context)


def write_sweep_charts(run_dir: Path, charts: list[dict[str, Any]]) -> list[Path]:
    """Each chart of success against the adaptive attacker's weight as a standalone SVG beside report.html
    (`success-vs-weight-<its title>.svg`), for a report's README to show; charts no longer drawn are removed."""
    template, css = _ENVIRONMENT.get_template("sweep-standalone.svg.j2"), _asset("sweep.css")
    paths = []
    for chart in charts:
        slug = re.sub(r"[^a-z0-9]+", "-", chart["title"].lower()).strip("-")[:SWEEP_SLUG_LENGTH]
        path = run_dir / f"{SWEEP_FILE_PREFIX}{slug}.svg"
        if path in paths:  # two titles alike up to the cut: numbered in order
            path = run_dir / f"{SWEEP_FILE_PREFIX}{slug}-{len(paths) + 1}.svg"
        write_atomic(path, template.render(c=chart, css=css))
        paths.append(path)
    for stale in set(run_dir.glob(f"{SWEEP_FILE_PREFIX}*.svg")) - set(paths):
        stale.unlink()
    return paths


def _asset(name: str) -> str:
    return (resources.files("sanitize") / "templates" / name).read_text(encoding="utf-8")


def _csp_hash(text: str) -> str:
    return "sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise SanitizeError(f"cannot read {path}: {error}") from None
    if not isinstance(value, dict):
        raise SanitizeError(f"{path} is not a JSON object")
    return value


def read_scores(path: Path) -> ScoreTable:
    """scores.csv (id, path, label, score, flagged), with a clear error for a damaged file."""
    ids, paths, labels, scores, flags = [], [], [], [], []
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                ids.append(row["id"])
                paths.append(row["path"])
                labels.append(int(row["label"]))
                scores.append(float(row["score"]))
                flags.append(row["flagged"] == "1")
    except (OSError, KeyError, TypeError, ValueError) as error:
        raise SanitizeError(f"cannot read {path}: {error!r}") from None
    return ScoreTable(ids, paths, np.array(labels, dtype=np.int64), np.array(scores), np.array(flags, dtype=bool))


def thumbnail(image: torch.Tensor) -> str:
    """A uint8 (3, H, W) image as a PNG data URI, shrunk to THUMBNAIL_SIDE on its long side when larger."""
    picture = Image.fromarray(image.permute(1, 2, 0).numpy())
    if max(picture.size) > THUMBNAIL_SIDE:
        picture.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _images(
    summary: dict[str, Any], data: str | os.PathLike | ImageDataset | None
) -> tuple[ImageDataset | None, str | None]:
    """The dataset the run read, for thumbnails, or (None, why not)."""
    expected = summary["data"].get("fingerprint")
    if not isinstance(data, ImageDataset):
        source = Path(data) if data is not None else Path(summary["data"]["source"])
        try:
            size = summary["data"].get("image_size")
            data = open_dataset(source, image_size=size[0] if size else None, progress=False)
        except (SanitizeError, OSError) as error:
            return None, f"images not shown: cannot open {source} ({error})"
    if expected and data.fingerprint != expected:
        return None, f"images not shown: {data.source} is not the data this run read (its fingerprint differs)"
    return data, None


def histogram(values: np.ndarray, threshold: float) -> dict[str, Any]:
    """An inline SVG histogram of scores over [0, 1]: bars (x, width, height in the plot area; red past the cut; height
    the square root of the count, so a few flagged examples stay visible beside thousands), the axis ticks and the
    threshold's x."""
    counts, edges = np.histogram(np.clip(values, 0, 1), bins=HISTOGRAM_BINS, range=(0, 1))
    top = max(int(counts.max()), 1) if len(counts) else 1
    width = HISTOGRAM_WIDTH / HISTOGRAM_BINS
    bars = [
        {
            "x": round(i * width, 2),
            "width": round(width, 2),
            "height": round(HISTOGRAM_HEIGHT * np.sqrt(c / top), 2),
            "count": int(c),
            "flagged": bool(edges[i + 1] > threshold),
        }
        for i, c in enumerate(counts)
        if c
    ]
    ticks = [{"x": round(t * HISTOGRAM_WIDTH, 2), "label": f"{t:g}"} for t in (0.0, 0.25, 0.5, 0.75, 1.0)]
    return {
        "bars": bars,
        "ticks": ticks,
        "threshold_x": round(min(max(threshold, 0.0), 1.0) * HISTOGRAM_WIDTH, 2),
        "top": top,
        "width": HISTOGRAM_WIDTH,
        "height": HISTOGRAM_HEIGHT,
    }


def _by_setting(sweeps: list[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """An evaluation's weight sweeps grouped into one chart per setting and term (its title), in their order."""
    charts: dict[str, list[dict[str, Any]]] = {}
    for sweep in sweeps:
        crafted = f" ({sweep['base']})" if sweep.get("base") else ""
        title = f"{sweep['attack']}{crafted}, {sweep['scale']}, {sweep['model']}, {sweep['epochs']} epochs, eps {sweep['eps']:g}: {sweep['term']}"
        charts.setdefault(title, []).append(sweep)
    return list(charts.items())


def sweep_chart(title: str, sweeps: list[dict[str, Any]]) -> dict[str, Any]:
    """An inline SVG chart of success (0-100%, up) against the adaptive attacker's weight, one line per arm in its own
    dash style (SWEEP_STYLES, named in a legend) with a mark at each measured weight: the weights evenly spaced in order
    (they span decades, from 0)."""
    weights = sorted({point["weight"] for sweep in sweeps for point in sweep["points"]})
    step = SWEEP_WIDTH / max(len(weights) - 1, 1)
    x = {weight: round(i * step, 1) for i, weight in enumerate(weights)}
    lines = []
    for i, sweep in enumerate(sweeps):
        xy = [(x[p["weight"]], round(SWEEP_HEIGHT * (1 - p["success"]), 1)) for p in sweep["points"]]
        points = " ".join(f"{a},{b}" for a, b in xy)
        marks = [{"x": a, "y": b} for a, b in xy]  # a lone weight draws no line: its mark shows it
        lines.append({"arm": sweep["arm"], "points": points, "marks": marks, "style": i % SWEEP_STYLES, "y": 14 * i})
    return {
        "title": title,
        "width": SWEEP_WIDTH,
        "height": SWEEP_HEIGHT,
        "ticks": [{"x": x[w], "label": f"{w:g}"} for w in weights],
        "lines": lines,
    }


def projection(
    space: np.ndarray, members: np.ndarray, flags: np.ndarray, ids: list[str], seed: int
) -> list[dict[str, Any]]:
    """One class's embeddings projected on their top two principal components, scaled into the plot; every flagged
    member and a random sample of the others."""
    flagged = members[flags[members]]
    others = members[~flags[members]]
    if len(others) > PROJECTION_POINTS:
        others = np.sort(np.random.default_rng(seed).choice(others, PROJECTION_POINTS, replace=False))
    chosen = np.concatenate([others, flagged])
    if len(chosen) < 3:
        return []
    xy = PCA(n_components=2, random_state=seed).fit_transform(np.asarray(space[chosen], dtype=np.float64))
    low, high = xy.min(axis=0), xy.max(axis=0)
    xy = 8 + (PLOT_SIZE - 16) * (xy - low) / np.where(high > low, high - low, 1)
    return [
        {
            "x": round(float(x), 1),
            "y": round(float(PLOT_SIZE - y), 1),
            "flagged": bool(flags[i]),
            "id": ids[i] if flags[i] else None,
        }
        for (x, y), i in zip(xy, chosen)
    ]


def _nearest(space: np.ndarray, labels: np.ndarray, position: int, count: int) -> list[int]:
    """The `count` nearest examples of the same class in `space` (fallback when the detector kept no neighbours)."""
    members = np.flatnonzero(labels == labels[position])
    members = members[members != position]
    distances = np.linalg.norm(
        np.asarray(space[members], dtype=np.float32) - np.asarray(space[position], dtype=np.float32), axis=1
    )
    return [int(i) for i in members[np.argsort(distances, kind="stable")[:count]]]


def thumbnail_order(flags: np.ndarray, scores: np.ndarray, reasons: np.ndarray | None, cap: int) -> np.ndarray:
    """The flagged examples shown, at most `cap`, highest score first: taken in turn from each flag reason's own
    ranking, so that a reason whose examples score low (the alarms' passes flag without raising scores) is shown too."""
    flagged = np.flatnonzero(flags)
    flagged = flagged[np.argsort(-scores[flagged], kind="stable")]
    why = np.zeros(len(flagged), dtype=np.int64) if reasons is None else np.asarray(reasons)[flagged].astype(np.int64)
    rank_in_reason = np.zeros(len(flagged), dtype=np.int64)
    for reason in np.unique(why):
        rank_in_reason[why == reason] = np.arange(int((why == reason).sum()))
    chosen = flagged[np.argsort(rank_in_reason, kind="stable")[:cap]]
    return chosen[np.argsort(-scores[chosen], kind="stable")]


def _kept_array(embeddings: Path, name: str) -> np.ndarray | None:
    """One array a scan keeps beside its embeddings (memory-mapped), or None where a detector or an older scan kept
    none."""
    path = embeddings / f"{name}.npy"
    return np.load(path, mmap_mode="r", allow_pickle=False) if path.exists() else None


def _explainer(embeddings: Path, classes: list[str]) -> Callable[[int], dict[str, Any]]:
    """Why the detector flagged an example (the rule, its isolation z within its class) and what the proxy calls it
    (class and probability), from the arrays a scan keeps; empty where a detector or an older scan kept none."""
    reasons, isolation, logits = (_kept_array(embeddings, name) for name in ("flag_reason", "isolation_z", "logits"))

    def explain(position: int) -> dict[str, Any]:
        why: dict[str, Any] = {}
        if reasons is not None and int(reasons[position]) in FLAG_REASONS:
            why["why"] = FLAG_REASONS[int(reasons[position])]
        if isolation is not None:
            why["isolation_z"] = float(isolation[position])
        if logits is not None:
            probabilities = softmax(np.asarray(logits[position : position + 1], dtype=np.float64))[0]
            best = int(probabilities.argmax())
            why["proxy_class"] = classes[best] if best < len(classes) else "?"
            why["proxy_confidence"] = float(probabilities[best])
        return why

    return explain


def _scan_context(
    run_dir: Path, summary: dict[str, Any], data, max_thumbnails: int, max_projection_classes: int
) -> dict[str, Any]:
    table = read_scores(run_dir / "scores.csv")
    classes = summary["data"]["classes"]
    threshold = float(summary["detector"].get("threshold") or 0.5)
    dataset, images_note = (
        _images(summary, data) if max_thumbnails else (None, "images not shown (max_thumbnails is 0)")
    )
    embeddings = run_dir / summary.get("embeddings", {}).get("directory", "embeddings")
    space_file = (
        embeddings / f"{summary.get('embeddings', {}).get('space', 'features')}.npy"
    )  # logit_gradient: not stored
    space_file = space_file if space_file.exists() else embeddings / "features.npy"
    space = np.load(space_file, mmap_mode="r", allow_pickle=False) if space_file.exists() else None
    neighbours = (
        np.load(embeddings / "neighbours.npy", mmap_mode="r", allow_pickle=False)
        if (embeddings / "neighbours.npy").exists()
        else None
    )
    per_class_detector = summary["detector"].get("per_class", {})
    per_class = []
    for c, name in enumerate(classes):
        members = table.labels == c
        info = per_class_detector.get(name, per_class_detector.get(str(c), {}))  # by index: summaries before 2026-12-01
        per_class.append(
            {
                "name": name,
                "examples": int(members.sum()),
                "flagged": int(table.flags[members].sum()),
                "fraction": float(table.flags[members].mean()) if members.any() else 0.0,
                "alarmed": bool(info.get("alarmed")),
                "alarm_p": info.get("alarm_p_value"),
                "first_pass": info.get("first_pass_flags"),
                "grouped": info.get("grouped_flags"),
                "second_pass": info.get("second_pass_flags"),
                "closed_group": info.get("closed_group") if (info.get("closed_group") or {}).get("alarmed") else None,
                "note": info.get("note"),
                "histogram": histogram(table.scores[members], threshold),
            }
        )

    def shown(position: int) -> dict[str, Any]:
        return {
            "id": table.ids[position],
            "path": table.paths[position],
            "class": classes[table.labels[position]],
            "score": float(table.scores[position]),
            "image": thumbnail(dataset.load_image(position)) if dataset else None,
        }

    explain = _explainer(embeddings, classes)
    order = thumbnail_order(table.flags, table.scores, _kept_array(embeddings, "flag_reason"), max_thumbnails)
    examples = []
    for position in order:
        near = (
            [int(i) for i in neighbours[position][:5] if i >= 0]
            if neighbours is not None
            else (_nearest(space, table.labels, position, 5) if space is not None else [])
        )
        examples.append(
            shown(position) | explain(position) | {"neighbours": [shown(i) for i in near] if dataset else []}
        )
    ranked = sorted(range(len(classes)), key=lambda c: (-per_class[c]["flagged"], c))[:max_projection_classes]
    projections = (
        [
            {
                "index": c,
                "name": classes[c],
                "points": projection(space, np.flatnonzero(table.labels == c), table.flags, table.ids, c),
            }
            for c in ranked
        ]
        if space is not None
        else []
    )
    poisons = None
    if "poisons" in summary:
        poisons = dict(summary["poisons"])
        index = {id_: i for i, id_ in enumerate(table.ids)}
        positions = sorted((index[i] for i in poisons["ids"] if i in index), key=lambda p: -table.scores[p])[
            :max_thumbnails
        ]
        poisons["shown"] = [shown(p) | {"caught": bool(table.flags[p])} for p in positions] if dataset else []
        target = Path(poisons.get("manifest", "")).parent / TARGET_IMAGE
        poisons["target_image"] = _target_thumbnail(target)
    return {
        "kind": "scan",
        "title": "sanitize scan",
        "summary": summary,
        "per_class": per_class,
        "examples": examples,
        "flagged_total": int(table.flags.sum()),
        "images_note": images_note,
        "projections": projections,
        "poisons": poisons,
        "max_thumbnails": max_thumbnails,
    }


def _target_thumbnail(path: Path) -> str | None:
    if not path.is_file():
        return None
    try:
        with Image.open(path) as picture:
            array = np.asarray(picture.convert("RGB"))
    except (OSError, ValueError):
        return None
    return thumbnail(torch.from_numpy(array.copy()).permute(2, 0, 1))


def _train_context(run_dir: Path, summary: dict[str, Any], data, max_thumbnails: int) -> dict[str, Any]:
    context: dict[str, Any] = {
        "kind": "train",
        "title": "sanitize train",
        "summary": summary,
        "rounds": [],
        "dropped": [],
    }
    if not summary.get("robust"):
        return context
    log = _read_json(run_dir / "drop_log.json")
    classes = summary["data"]["classes"]
    rows = log.get("dropped", [])
    for round_epoch in log.get("rounds", []):
        in_round = [r for r in rows if r["round"] == round_epoch]
        counts = (
            np.bincount([r["class"] for r in in_round], minlength=len(classes))
            if in_round
            else np.zeros(len(classes), int)
        )
        context["rounds"].append(
            {"epoch": round_epoch, "dropped": len(in_round), "per_class": [int(n) for n in counts]}
        )
    dataset, note = _images(summary, data) if max_thumbnails else (None, None)
    context["images_note"] = note
    context["dropped"] = [
        {
            "id": r["id"],
            "class": classes[r["class"]],
            "round": r["round"],
            "image": thumbnail(dataset.load_image(r["position"])) if dataset else None,
        }
        for r in rows[:max_thumbnails]
    ]
    return context
