import json
import os
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

import sanitize
from sanitize.cli import cli
from sanitize.detectors.knn_density import KnnDensityOptions

FAST = {"model": "tiny", "epochs": 2, "batch_size": 16, "augment": False, "quiet": True}


@pytest.fixture(scope="module")
def two_scans(tmp_path_factory, digits_npz):
    """Two scans of the same digits with different proxies (seeds): one passes, one fails its gate."""
    root = tmp_path_factory.mktemp("scans")
    passing = sanitize.scan(digits_npz, root / "passing", **FAST)
    failing = sanitize.scan(digits_npz, root / "failing", seed=1, max_flagged_fraction=0.0, **FAST)
    assert passing.passed and not failing.passed and passing.flagged_ids != failing.flagged_ids
    return root / "passing", root / "failing", passing, failing


def invoke(*args):
    return CliRunner().invoke(cli, ["combine", *map(str, args)])


def test_the_combined_gate_fails_when_any_scan_fails_and_flags_the_union(tmp_path, two_scans):
    passing_dir, failing_dir, passing, failing = two_scans
    result = invoke(passing_dir, failing_dir, "--out", tmp_path / "both")
    assert result.exit_code == 1 and "gate      FAILED" in result.output, result.output
    flagged = (tmp_path / "both" / "flagged.txt").read_text().split()
    assert set(flagged) == set(passing.flagged_ids) | set(failing.flagged_ids) and len(flagged) == len(set(flagged))
    summary = json.loads((tmp_path / "both" / "summary.json").read_text())
    assert summary["kind"] == "combined-scan" and [s["verdict"] for s in summary["scans"]] == ["passed", "failed"]
    assert summary["flagged"]["count"] == len(flagged)
    assert summary["gate"]["flagged_fraction"] == pytest.approx(len(flagged) / passing.summary["data"]["examples"])
    assert summary["flagged"]["by_every_scan"] == len(set(passing.flagged_ids) & set(failing.flagged_ids))
    default = KnnDensityOptions().closed_group_conductance
    assert [(s["proxy"], s["closed_group_conductance"]) for s in summary["scans"]] == [("tiny", default)] * 2
    api = sanitize.combine_scans([passing_dir, failing_dir], tmp_path / "api")
    assert not api.passed and api.flagged_ids == flagged


def test_the_combined_report_shows_the_verdict_links_each_scan_and_renders_again(tmp_path, two_scans):
    passing_dir, failing_dir = two_scans[:2]
    out = tmp_path / "both"
    assert invoke(passing_dir, failing_dir, "--out", out).exit_code == 1
    page = (out / "report.html").read_text()
    assert "FAILED" in page and "flagged by every scan" in page
    for folder in (passing_dir, failing_dir):
        link = f'href="./{os.path.relpath(folder / "report.html", out)}"'
        assert link in page and (out / os.path.relpath(folder / "report.html", out)).is_file()
    (out / "report.html").unlink()
    result = CliRunner().invoke(cli, ["report", str(out)])
    assert result.exit_code == 0 and (out / "report.html").read_text() == page, result.output


def test_folder_names_are_escaped_in_the_report_and_never_read_as_a_link_scheme(tmp_path, two_scans):
    hostile = tmp_path / "javascript:alert(1)<script>x</script>"
    shutil.copytree(two_scans[0], hostile)
    result = invoke(hostile, two_scans[0], "--out", tmp_path)  # the hostile scan inside the output folder
    assert result.exit_code == 0, result.output
    page = (tmp_path / "report.html").read_text()
    assert "<script>x" not in page and "&lt;script&gt;x" in page
    assert 'href="./javascript%3Aalert%281%29%3Cscript%3Ex%3C/script%3E/report.html"' in page


def test_scans_that_all_pass_pass(tmp_path, two_scans):
    passing_dir = two_scans[0]
    result = invoke(passing_dir, passing_dir, "--out", tmp_path / "same")
    assert result.exit_code == 0 and "gate      PASSED" in result.output, result.output
    # two scans that trained one architecture are one view of the data, and the gate says so
    assert "note      " in result.output and "the same proxy architecture (tiny)" in result.output
    assert "the same proxy architecture (tiny)" in (tmp_path / "same" / "report.html").read_text()
    assert (tmp_path / "same" / "flagged.txt").read_text().split() == two_scans[2].flagged_ids


def test_scans_of_other_data_are_refused(tmp_path, two_scans, digits16):
    x, y = digits16
    np.savez(tmp_path / "fewer.npz", x=x[:300], y=y[:300])
    other = sanitize.scan(tmp_path / "fewer.npz", tmp_path / "other", **FAST)
    assert other.passed
    result = invoke(two_scans[0], tmp_path / "other", "--out", tmp_path / "both")
    assert result.exit_code == 2 and result.output.strip().splitlines() == [
        "error: the scans are of different data (their fingerprints differ)"
    ]


@pytest.mark.parametrize(
    "damage",
    ["empty folder", "not json", "not a scan's summary", "no data source", "no flagged.txt", "more ids than examples"],
)
def test_anything_but_a_finished_scan_is_one_line_and_leaves_no_verdict(tmp_path, two_scans, damage):
    broken = tmp_path / "broken"
    broken.mkdir()
    if damage != "empty folder":
        (broken / "flagged.txt").write_text("")
        summary = {
            "not json": "{",
            "not a scan's summary": '{"kind": "scan", "gate": []}',
            "no data source": json.dumps(
                json.loads((two_scans[0] / "summary.json").read_text()) | {"data": {"fingerprint": "x", "examples": 1}}
            ),
        }
        (broken / "summary.json").write_text(summary.get(damage, (two_scans[0] / "summary.json").read_text()))
        if damage == "no flagged.txt":
            (broken / "flagged.txt").unlink()
        if damage == "more ids than examples":
            (broken / "flagged.txt").write_text(
                "".join(f"{i}\n" for i in range(two_scans[2].summary["data"]["examples"] + 1))
            )
    out = tmp_path / "both"
    assert invoke(two_scans[0], two_scans[0], "--out", out).exit_code == 0  # a passing verdict from an earlier run
    result = invoke(two_scans[0], broken, "--out", out)
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert result.output.startswith(f"error: {broken}")
    assert not (out / "summary.json").exists()


def test_one_scan_or_an_output_that_is_a_scan_is_refused(tmp_path, two_scans):
    before = (two_scans[0] / "summary.json").read_bytes()
    result = invoke(two_scans[0], two_scans[1], "--out", two_scans[0])
    assert result.exit_code == 2 and "it would overwrite that scan's summary" in result.output
    assert (two_scans[0] / "summary.json").read_bytes() == before
    result = invoke(two_scans[0], "--out", tmp_path / "one")
    assert result.exit_code == 2 and result.output.strip() == "error: combine needs at least two scans"
