"""Hostile ImageFolder trees: every special file, name and structure ends in a recorded skip, never a hang, a crash,
unbounded memory or an id that breaks the one-id-per-line outputs."""

import os
import shutil
import threading

import pytest

from sanitize.data import folder as folder_module
from sanitize.data import open_dataset


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
        handle.truncate(folder_module.MAX_IMAGE_BYTES + 1)
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
    dataset = _open_with_timeout(digits_folder)
    skips = _skips(dataset)
    assert "not followed" in skips["digit_3/loop"] and "not followed" in skips["digit_3/elsewhere"]
    assert len(dataset) == 401 and len(set(dataset.ids)) == len(dataset)  # nothing counted twice
    os.remove(deep / "deep.png")
    while deep != digits_folder / "digit_5":  # shutil.rmtree recurses too: leave no tree it cannot remove
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
