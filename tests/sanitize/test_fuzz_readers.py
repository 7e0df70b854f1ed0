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
