"""report.html: self-contained, escaped, capped, scored against a manifest, re-rendered from a run's outputs, and
rendered by a real browser (headless Chromium: Debian's `chromium`; `.ci/run` installs it and sets
SANITIZE_REQUIRE_BROWSER=1 so that CI fails rather than skips without it)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from xml.etree import ElementTree

import markupsafe
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from sanitize import scan
from sanitize.cli import cli
from sanitize.data.digits import write_image_folder
from sanitize.report import (
    HISTOGRAM_WIDTH,
    histogram,
    sweep_chart,
    thumbnail_order,
    write_report,
    write_sweep_charts,
)

FAST = {"model": "tiny", "epochs": 2, "batch_size": 32, "augment": False, "quiet": True, "k_fraction": 0.3}
HOSTILE_FILE = "<img src=x onerror=document.title='pwned'>.png"
HOSTILE_CLASS = "cl\"a'ss <b>é ✓"


class Elements(HTMLParser):
    """Every start tag with its attributes, and the text inside <style> and <script>."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.blocks: dict[str, list[str]] = {"style": [], "script": []}
        self._inside: str | None = None

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._inside = tag if tag in self.blocks else None

    def handle_endtag(self, tag):
        self._inside = None

    def handle_data(self, data):
        if self._inside:
            self.blocks[self._inside].append(data)


def parse(html: str) -> Elements:
    parser = Elements()
    parser.feed(html)
    return parser


def hostile_folder(root: Path, digits16) -> tuple[Path, list[str]]:
    """Three digit classes (one with a hostile name), two files renamed to markup, one corrupt file with a hostile name."""
    x, y = digits16
    keep = np.flatnonzero(y < 3)[:150]
    ids = write_image_folder(root, x[keep], y[keep], ["zero", "one", HOSTILE_CLASS])
    victim = root / ids[0]
    victim.rename(victim.with_name(HOSTILE_FILE))
    (root / "one" / "<svg onload=alert(2)>.png").write_bytes(b"not a png")
    ids[0] = f"zero/{HOSTILE_FILE}"
    return root, ids


@pytest.fixture(scope="module")
def hostile_scan(tmp_path_factory, digits16):
    base = tmp_path_factory.mktemp("hostile")
    data, ids = hostile_folder(base / "data", digits16)
    manifest = base / "poison_manifest.json"
    manifest.write_text(
        json.dumps(
            {
                "method": "test",
                "eps": 16,
                "target_class": 1,
                "intended_class": 0,
                "target_id": "t<i>",
                "poison_ids": [ids[0], ids[1], ids[2]],
            }
        )
    )
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(base / "target.png")
    result = scan(data, base / "out", manifest=str(manifest), threshold=0.3, **FAST)
    return base, data, result


def test_everything_from_the_data_is_escaped_and_only_our_script_may_run(hostile_scan):
    _, _, result = hostile_scan
    html = result.files["report"].read_text(encoding="utf-8")
    page = parse(html)
    tags = [tag for tag, _ in page.tags]
    assert tags.count("script") == 1 and "b" not in tags  # the class name's <b> and the file's <script> stayed text
    assert all(a.get("src", "").startswith("data:image/png;base64,") for tag, a in page.tags if tag == "img")
    assert not any(name.startswith("on") for _, a in page.tags for name in a)
    assert "&lt;img src=x onerror=document.title=&#39;pwned&#39;&gt;.png" in html
    assert "&lt;svg onload=alert(2)&gt;.png" in html  # the unreadable file is listed, escaped, with its reason
    assert "cl&#34;a&#39;ss &lt;b&gt;é ✓" in html
    csp = next(
        a["content"] for tag, a in page.tags if tag == "meta" and a.get("http-equiv") == "Content-Security-Policy"
    )
    assert "default-src 'none'" in csp and "http" not in csp
    for block in ("style", "script"):
        digest = base64.b64encode(hashlib.sha256("".join(page.blocks[block]).encode()).digest()).decode()
        assert f"{block}-src 'sha256-{digest}'" in csp  # the inline code runs only because its hash is allowed
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", html)  # nothing is fetched


def test_report_holds_the_verdict_classes_flagged_thumbnails_projection_and_the_manifest(hostile_scan):
    _, _, result = hostile_scan
    html = result.files["report"].read_text(encoding="utf-8")
    summary = result.summary
    assert (
        result.summary["gate"]["verdict"].upper()
    ) in html and f"{summary['flagged']['count']}</strong> of {summary['data']['examples']}" in html
    flagged = int(result.flags.sum())
    assert flagged >= 1
    assert "why: isolated" in html and "the proxy calls it" in html  # each flagged example says why
    assert html.count('class="example"') == min(flagged, 48)
    assert html.count('<svg class="hist"') == 3 and 'data-projection="' in html
    assert html.count('<line class="cut"') == 3 and html.count(">0.5</text>") >= 3  # the cut and the axis
    assert 'classList.toggle("enlarged")' in html and "figure.enlarged img" in html  # thumbnails enlarge on click
    poisons = summary["poisons"]
    assert poisons["caught"] == sum(int(result.flags[result.ids.index(i)]) for i in poisons["ids"])
    assert "Against the poison manifest" in html and "t&lt;i&gt;" in html and 'alt="target"' in html
    assert html.count('class="caught"') + html.count('class="missed"') == 3


def test_histogram_marks_the_cut_and_keeps_a_few_flagged_examples_visible():
    scores = np.concatenate([np.full(5000, 0.1), np.full(3, 0.9)])
    h = histogram(scores, threshold=0.5)
    assert h["threshold_x"] == HISTOGRAM_WIDTH / 2 and h["top"] == 5000
    assert [t["label"] for t in h["ticks"]] == ["0", "0.25", "0.5", "0.75", "1"]
    tall, short = h["bars"]
    assert not tall["flagged"] and short["flagged"] and short["count"] == 3
    assert short["height"] > 0.02 * tall["height"]  # square-root heights: 3 of 5,003 is not a flat line


def test_thumbnails_are_capped_and_the_rerender_checks_the_data(hostile_scan, tmp_path, digits16):
    base, data, result = hostile_scan
    full = result.files["report"].stat().st_size
    runner = CliRunner()
    capped = runner.invoke(cli, ["report", str(base / "out"), "--max-thumbnails", "1"])
    assert capped.exit_code == 0, capped.output
    html = (base / "out" / "report.html").read_text(encoding="utf-8")
    assert html.count('class="example"') == 1 and (base / "out" / "report.html").stat().st_size < full
    other, _ = hostile_folder(tmp_path / "other", (digits16[0][::-1].copy(), digits16[1][::-1].copy()))
    moved = runner.invoke(cli, ["report", str(base / "out"), "--data", str(other)])
    assert moved.exit_code == 0, moved.output
    html = (base / "out" / "report.html").read_text(encoding="utf-8")
    assert (
        "is not the data this run read" in html
        and "data:image/png" not in html.split("<h2>Most isolated")[1].split("<h2>")[0]
    )
    write_report(base / "out", data)  # back to the full report for the other tests


def test_an_alarmed_class_shows_its_p_value_second_pass_and_escaped_name(hostile_scan, tmp_path):
    base, data, _ = hostile_scan
    run = tmp_path / "run"
    shutil.copytree(base / "out", run)
    summary = json.loads((run / "summary.json").read_text())
    assert not any(info.get("alarmed") for info in summary["detector"]["per_class"].values())
    summary["detector"]["per_class"][HOSTILE_CLASS].update(  # its name is escaped in the verdict line too
        {"alarmed": True, "alarm_p_value": 3.2e-9, "first_pass_flags": 12, "grouped_flags": 9, "second_pass_flags": 7}
    )
    summary["gate"]["alarmed_classes"] = [HOSTILE_CLASS]
    (run / "summary.json").write_text(json.dumps(summary))
    html = write_report(run, data).read_text(encoding="utf-8")
    assert "12 flags in the first pass (count test p 3.2e-09), 9 of them grouped; the second pass flagged 7" in html
    assert f"class alarm in {markupsafe.escape(HOSTILE_CLASS)}</span>" in html and "<b>" not in html


def test_a_closed_group_alarm_says_so_without_a_count_test(hostile_scan, tmp_path):
    base, data, _ = hostile_scan
    run = tmp_path / "run"
    shutil.copytree(base / "out", run)
    summary = json.loads((run / "summary.json").read_text())
    summary["detector"]["per_class"][HOSTILE_CLASS].update(
        {"alarmed": True, "closed_group": {"size": 351, "conductance": 0.0771, "alarmed": True}}
    )
    summary["gate"]["alarmed_classes"] = [HOSTILE_CLASS]
    (run / "summary.json").write_text(json.dumps(summary))
    html = write_report(run, data).read_text(encoding="utf-8")
    assert "closed group: 351 examples closed to the rest of the class (conductance 0.077), all flagged" in html
    assert "count test p" not in html


def test_bad_run_folders_and_manifests_are_clear_errors(tmp_path, hostile_scan):
    base, data, _ = hostile_scan
    runner = CliRunner()
    empty = runner.invoke(cli, ["report", str(tmp_path)])
    assert empty.exit_code == 2 and "cannot read" in empty.output
    (tmp_path / "summary.json").write_text("[1, 2]")
    wrong = runner.invoke(cli, ["report", str(tmp_path)])
    assert wrong.exit_code == 2 and "not a JSON object" in wrong.output
    stranger = tmp_path / "m.json"
    stranger.write_text(
        json.dumps({"method": "x", "eps": 1, "target_class": 0, "intended_class": 1, "poison_ids": ["nope.png"]})
    )
    foreign = runner.invoke(
        cli,
        [
            "scan",
            str(data),
            "--out",
            str(tmp_path / "s"),
            "--manifest",
            str(stranger),
            "--model",
            "tiny",
            "--epochs",
            "1",
            "--quiet",
        ],
    )
    assert foreign.exit_code == 2 and "not in the data" in foreign.output
    assert not (tmp_path / "s" / "proxy").exists()  # refused before any training


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.environ.get("SANITIZE_REQUIRE_BROWSER"):
        pytest.fail("headless Chromium is required here (SANITIZE_REQUIRE_BROWSER) but `chromium` is not on PATH")
    pytest.skip("no `chromium` on PATH: install Debian's chromium to run the browser test")


def headless(browser: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-quic",
        f"--user-data-dir={profile}",
    ]
    return subprocess.run([browser, *flags, *args], capture_output=True, text=True, timeout=120)


def test_a_real_browser_renders_the_report_runs_our_script_and_none_from_the_data(hostile_scan, tmp_path):
    browser = chromium()
    base, _, result = hostile_scan
    page = result.files["report"].resolve().as_uri()
    shot = tmp_path / "report.png"
    rendered = headless(
        browser, tmp_path / "profile-1", f"--screenshot={shot}", "--window-size=1200,1600", "--hide-scrollbars", page
    )
    assert shot.exists(), rendered.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.std() > 10 and (pixels < 128).mean() > 0.01  # text, tables and thumbnails, not a blank page
    dom = headless(browser, tmp_path / "profile-2", "--dump-dom", "--virtual-time-budget=2000", page).stdout
    assert (
        "<title>sanitize scan</title>" in dom and "pwned" not in dom.split("</title>")[0]
    )  # the file name's handler never ran
    tags = parse(dom).tags
    assert not any(tag == "img" and a.get("src") == "x" for tag, a in tags) and "b" not in [tag for tag, _ in tags]
    plots = [a for tag, a in tags if "data-projection" in a]
    assert plots and sum("hidden" not in a for a in plots) == 1  # report.js ran (its CSP hash matched): one class shown


def test_thumbnails_take_every_flag_reason_in_turn_so_low_scored_groups_are_shown():
    flags = np.array([True, True, True, True, True, False, True])
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.1, 0.95, 0.2])
    reasons = np.array([1, 1, 1, 1, 6, 0, 6], dtype=np.int8)  # 6: the closed-group pass, scored below the cut
    assert thumbnail_order(flags, scores, reasons, 4).tolist() == [0, 1, 6, 4]
    assert thumbnail_order(flags, scores, None, 3).tolist() == [0, 1, 2]
    assert thumbnail_order(flags, scores, reasons, 10).tolist() == [0, 1, 2, 3, 6, 4]


def test_sweep_charts_are_standalone_escaped_svgs_and_charts_no_longer_drawn_are_removed(tmp_path):
    hostile = "<script>alert(1)</script> & 'x'"
    chart = sweep_chart(
        hostile,
        [{"arm": hostile, "points": [{"weight": 0.0, "success": 1.0}, {"weight": 0.1, "success": 0.5}]}],
    )
    stale = tmp_path / "success-vs-weight-gone.svg"
    stale.write_text("<svg/>")
    (path,) = write_sweep_charts(tmp_path, [chart])
    assert not stale.exists() and path.name.startswith("success-vs-weight-script-alert-1-script")
    root = ElementTree.fromstring(path.read_bytes())  # well-formed XML that names the SVG namespace
    svg = "{http://www.w3.org/2000/svg}"
    assert root.tag == f"{svg}svg" and root.find(f"{svg}title").text == f"success against weight: {hostile}"
    assert [p.get("points") for p in root.iter(f"{svg}polyline")] == ["0.0,0.0 360.0,75.0"]
    assert "<script" not in path.read_text() and [e for e in root.iter() if e.tag.endswith("script")] == []
    assert [t.text for t in root.iter(f"{svg}text") if t.text == hostile] == [hostile, hostile]  # title and legend
