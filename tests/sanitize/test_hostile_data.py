"""Hostile ImageFolder trees: every special file, name and structure ends in a recorded skip, never a hang, a crash,
unbounded memory or an id that breaks the one-id-per-line outputs."""

import io
import os
import pickle
import shutil
import struct
import threading
import zipfile
import zlib

import numpy as np
import pytest
from PIL import Image

from sanitize.data import folder as folder_module
from sanitize.data import open_dataset
from sanitize.data.encoded import MAX_IMAGE_BYTES
from sanitize.errors import DataError


def _skips(dataset):
    return {s.id: s.reason for s in dataset.skipped}


def _open_with_timeout(root, seconds=60):
    """open_dataset in a thread: a hang fails the test instead of stalling the suite."""
    result = {}
    thread = threading.Thread(target=lambda: result.update(dataset=open_dataset(root, progress=False)), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "opening the folder hung"
    return result["dataset"]


def test_special_files_are_skipped_with_a_reason_and_never_read(digits_folder):
    os.mkfifo(digits_folder / "digit_0" / "pipe.png")
    os.symlink("/dev/zero", digits_folder / "digit_0" / "zero.png")
    with open(digits_folder / "digit_1" / "huge.png", "wb") as handle:  # sparse: its size says it all
        handle.truncate(MAX_IMAGE_BYTES + 1)
    os.symlink(digits_folder / "nowhere.png", digits_folder / "digit_1" / "dangling.png")
    dataset = _open_with_timeout(digits_folder)
    skips = _skips(dataset)
    assert skips["digit_0/pipe.png"] == "not a regular file" and skips["digit_0/zero.png"] == "not a regular file"
    assert "larger than 64 MiB" in skips["digit_1/huge.png"] and "cannot be read" in skips["digit_1/dangling.png"]
    assert len(dataset) == 400


def test_names_that_would_break_one_id_per_line_are_skipped(digits_folder):
    source = digits_folder / "digit_2" / os.listdir(digits_folder / "digit_2")[0]
    shutil.copy(source, digits_folder / "digit_2" / "two\nlines.png")
    shutil.copy(source, os.path.join(os.fsencode(digits_folder / "digit_2"), b"latin1-\xe9.png"))
    (digits_folder / "bad\tclass").mkdir()
    shutil.copy(source, digits_folder / "bad\tclass" / "x.png")
    dataset = _open_with_timeout(digits_folder)
    skips = _skips(dataset)
    assert "control character" in skips["digit_2/two\nlines.png"]
    assert "not valid UTF-8" in skips["digit_2/latin1-\\xe9.png"]
    assert "class folder" in skips["bad\tclass"] and "bad\tclass" not in dataset.classes
    assert all("\n" not in i and "\t" not in i for i in dataset.ids) and len(dataset) == 400
    for record in dataset.skipped:  # every record can be written as UTF-8 (summary.json)
        (record.id + record.path + record.reason).encode("utf-8")


def test_folder_symlinks_are_not_followed_and_any_depth_is_walked(digits_folder):
    os.symlink(".", digits_folder / "digit_3" / "loop")
    os.symlink(digits_folder / "digit_4", digits_folder / "digit_3" / "elsewhere")
    deep = digits_folder / "digit_5"
    source = deep / os.listdir(deep)[0]
    for _ in range(1500):  # deeper than Python's recursion limit (os.makedirs itself would recurse)
        deep = deep / "d"
        os.mkdir(deep)
    shutil.copy(source, deep / "deep.png")
    try:
        dataset = _open_with_timeout(digits_folder)
    finally:
        _remove_deep(deep, digits_folder / "digit_5")
    skips = _skips(dataset)
    assert "not followed" in skips["digit_3/loop"] and "not followed" in skips["digit_3/elsewhere"]
    assert len(dataset) == 401 and len(set(dataset.ids)) == len(dataset)  # nothing counted twice


def _remove_deep(deep, top):
    """Bottom-up, without recursion: shutil.rmtree (and pytest's clean-up of old temporary folders) recurses."""
    for name in os.listdir(deep):
        os.remove(deep / name)
    while deep != top:
        os.rmdir(deep)
        deep = deep.parent


def test_an_unreadable_subfolder_is_recorded(digits_folder, monkeypatch):
    (digits_folder / "digit_6" / "locked").mkdir()
    real = os.scandir

    def scandir(path):
        if os.fspath(path).endswith("locked"):
            raise PermissionError(13, "Permission denied")
        return real(path)

    monkeypatch.setattr(folder_module.os, "scandir", scandir)
    skips = _skips(_open_with_timeout(digits_folder))
    assert "folder cannot be read: Permission denied" == skips["digit_6/locked"]


@pytest.mark.parametrize("content", [b"", b"\x89PNG\r\n\x1a\n" + b"\0" * 20, b"GIF89a" + b"\xff" * 40])
def test_garbage_behind_an_image_extension_is_a_recorded_skip(digits_folder, content):
    (digits_folder / "digit_7" / "junk.png").write_bytes(content)
    assert "digit_7/junk.png" in _skips(_open_with_timeout(digits_folder))


def test_a_decompression_bomb_is_skipped_from_its_header(digits_folder):
    """A PNG whose header declares 10,000 x 10,000 px (a few bytes on disk, 300 MB decoded; PIL itself only warns): refused unread."""
    buffer = io.BytesIO()
    Image.new("L", (8, 8)).save(buffer, "PNG")
    png = bytearray(buffer.getvalue())
    png[16:24] = struct.pack(">II", 10_000, 10_000)  # IHDR width and height
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))  # the chunk's CRC over its type and data
    (digits_folder / "digit_3" / "bomb.png").write_bytes(bytes(png))
    assert (
        _skips(_open_with_timeout(digits_folder))["digit_3/bomb.png"] == "ValueError: 10000x10000 px, more than 89 Mpx"
    )


def _npz_with_member(path, name, header_shape, body=b""):
    """An .npz whose member `name` declares `header_shape` (uint8) in its .npy header but holds only `body`."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "|u1", "fortran_order": False, "shape": header_shape})
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(name + ".npy", buffer.getvalue() + body)
        archive.writestr("y.npy", _npy(np.zeros(2, np.int64)))


def _npy(array):
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda p: np.savez(p, x=np.zeros((2, 16, 16, 3), np.uint8), y=np.array([0, 2**64 - 1], np.uint64)),
            "a label of",
        ),
        (lambda p: np.savez(p, x=np.zeros((2, 16, 16, 3), np.uint8), y=np.array([0, 10**9])), "a label of"),
        (lambda p: np.savez(p, x=np.zeros((2, 1, 1, 3), np.uint8), y=np.array([0, 1])), "at least 8x8"),
        (lambda p: np.savez(p, x=np.zeros((0, 16, 16, 3), np.uint8), y=np.zeros(0, int)), "no images"),
        (lambda p: _npz_with_member(p, "x", (10**6, 1000, 1000, 3)), "declares"),
        (lambda p: np.save(open(p, "wb"), np.zeros(3)), "single .npy array"),
        (lambda p: open(p, "w").write("x,y\n1,2\n"), "not an .npz archive"),
        (lambda p: pickle.dump({"x": 1}, open(p, "wb")), "not an .npz archive"),
    ],
    ids=["uint64-max label", "label 1e9", "1x1 images", "no images", "zip bomb header", "npy", "text", "pickle"],
)
def test_hostile_npz_is_a_one_line_data_error(tmp_path, make, message):
    path = tmp_path / "data.npz"
    make(path)
    with pytest.raises(DataError, match=message) as caught:
        open_dataset(path)
    assert "allow_pickle" not in str(caught.value) and "\n" not in str(caught.value)


def test_a_folder_of_tiny_images_is_refused_unless_resized(tmp_path):
    for label in ("a", "b"):
        (tmp_path / "data" / label).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (1, 1), (i, 0, 0)).save(tmp_path / "data" / label / f"{i}.png")
    with pytest.raises(DataError, match="at least 8x8"):
        open_dataset(tmp_path / "data", progress=False)
    assert open_dataset(tmp_path / "data", image_size=16, progress=False).image_size == (16, 16)


def test_skip_reasons_and_notes_read_as_words(digits_folder):
    (digits_folder / "digit_8" / "not-an-image.png").write_bytes(b"plain text, not a picture")
    (digits_folder / "digit_8" / "readme.txt").write_text("notes")
    dataset = _open_with_timeout(digits_folder)
    reason = _skips(dataset)["digit_8/not-an-image.png"]
    assert "object at 0x" not in reason and reason.startswith("UnidentifiedImageError")
    assert any(note == "1 file without an image extension ignored: digit_8/readme.txt" for note in dataset.notes)
