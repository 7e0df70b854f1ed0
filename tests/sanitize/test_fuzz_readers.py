"""Property tests of the readers an attacker feeds: arbitrary bytes as an image file, as an .npz, inside an .npz
member, and as a manifest end in a recorded skip or a DataError / SanitizeError, never another exception or a hang."""

import io
import json
import tempfile
import zipfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from sanitize.data import open_dataset
from sanitize.errors import DataError, SanitizeError
from sanitize.manifest import read_manifest

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
IMAGE_HEADERS = [
    b"",
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff\xe0",
    b"GIF89a",
    b"BM",
    b"RIFF\0\0\0\0WEBP",
    b"II*\0",
    b"P6\n",
]


@FUZZ
@given(
    header=st.sampled_from(IMAGE_HEADERS),
    body=st.binary(max_size=2048),
    suffix=st.sampled_from([".png", ".jpg", ".gif", ".webp", ".bmp", ".tif", ".ppm"]),
)
def test_any_bytes_behind_an_image_extension_are_decoded_or_skipped(header, body, suffix):
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder) / "data"
        for label in ("a", "b"):
            (root / label).mkdir(parents=True)
            Image.new("RGB", (16, 16), (40, 80, 120)).save(root / label / "good.png")
        (root / "a" / f"fuzz{suffix}").write_bytes(header + body)
        dataset = open_dataset(root, progress=False)
        assert len(dataset) + len(dataset.skipped) == 3
        for index in range(len(dataset)):
            assert dataset.load_image(index).shape == (3, 16, 16)


@FUZZ
@given(content=st.one_of(st.binary(max_size=4096), st.binary(max_size=64).map(lambda b: b"PK\x03\x04" + b)))
def test_any_bytes_as_an_npz_are_a_data_error_at_worst(content):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "data.npz"
        path.write_bytes(content)
        try:
            open_dataset(path)
        except DataError:
            pass


def _npy(array):
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


@FUZZ
@given(member=st.binary(max_size=512), keep_header=st.booleans(), cut=st.integers(0, 200))
def test_any_bytes_inside_an_npz_member_are_a_data_error_at_worst(member, keep_header, cut):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "data.npz"
        good = _npy(np.zeros((4, 16, 16, 3), np.uint8))
        x = (good[:cut] + member) if keep_header else member
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("x.npy", x)
            archive.writestr("y.npy", _npy(np.arange(4)))
        try:
            open_dataset(path)
        except DataError:
            pass


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@FUZZ
@given(
    record=st.one_of(
        JSON,
        st.fixed_dictionaries(
            {"method": JSON, "eps": JSON, "target_class": JSON, "intended_class": JSON, "poison_ids": JSON},
            optional={"poison_indices": JSON},
        ),
    ),
    raw=st.binary(max_size=64),
    as_json=st.booleans(),
)
def test_any_manifest_reads_or_is_a_clear_error(record, raw, as_json):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "poison_manifest.json"
        path.write_bytes(json.dumps(record).encode() if as_json else raw)
        try:
            assert isinstance(read_manifest(path), dict)
        except SanitizeError:
            pass


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
SCAN_SUMMARY = {
    "kind": "scan",
    "data": {"source": "d.npz", "fingerprint": "sha256:0", "examples": 3},
    "model": {"name": "convnet"},
    "gate": {"verdict": "passed", "passed": True, "flagged_fraction": 0.0, "alarmed_classes": []},
}


@FUZZ
@given(
    field=st.sampled_from(
        [
            ("kind",),
            ("data",),
            ("data", "examples"),
            ("model",),
            ("gate",),
            ("gate", "verdict"),
            ("gate", "alarmed_classes"),
            ("gate", "flagged_fraction"),
            ("data", "source"),
        ]
    ),
    value=JSON,
    flagged=st.binary(max_size=256),
)
def test_any_summary_field_or_flagged_bytes_in_a_scan_folder_combine_or_are_one_error(field, value, flagged):
    """`sanitize combine` reads folders a user points it at: any value in a summary's field, any bytes as flagged.txt,
    give a combined result or a SanitizeError, never another exception."""
    from sanitize.combine import combine_scans

    summary = json.loads(json.dumps(SCAN_SUMMARY))
    holder = summary
    for name in field[:-1]:
        holder = holder[name]
    holder[field[-1]] = value
    with tempfile.TemporaryDirectory() as folder:
        good, odd = Path(folder) / "good", Path(folder) / "odd"
        for scan, content, ids in ((good, SCAN_SUMMARY, b"0\n"), (odd, summary, flagged)):
            scan.mkdir()
            (scan / "summary.json").write_text(json.dumps(content))
            (scan / "flagged.txt").write_bytes(ids)
        try:
            result = combine_scans([good, odd], Path(folder) / "out")
        except SanitizeError:
            assert not (Path(folder) / "out" / "summary.json").exists()
        else:
            assert result.flagged_ids[0] == "0" and result.summary["gate"]["verdict"] in (
                "passed",
                "failed",
                "inconclusive",
            )
