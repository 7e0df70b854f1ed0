"""The decoded copy (sanitize.data.decoded): each file decoded once, torn rows decoded again, space reserved up front."""

import csv
import errno
import json
import os
import re

import numpy as np
import pytest
import torch

import sanitize
from sanitize.config import TrainConfig
from sanitize.data import iterate_batches, keep_decoded, open_dataset
from sanitize.data.decoded import copy_bytes, decoded_copy_plan
from sanitize.errors import DataError
from sanitize.models import create_model
from sanitize.training import train_model

FAST = {"model": "tiny", "epochs": 2, "batch_size": 16, "augment": False, "quiet": True}


def test_later_passes_read_the_copy_not_the_files(digits_folder, tmp_path):
    plain = open_dataset(digits_folder, image_size=20, progress=False)
    kept = plain.with_decoded_copy(tmp_path / "decoded")
    first = kept.load_batch(range(len(kept)))[0]
    assert torch.equal(first, plain.load_batch(range(len(plain)))[0]) and kept.decoded.written() == len(kept)
    for path in digits_folder.rglob("*.png"):  # the files are gone: only the copy can answer now
        path.unlink()
    assert torch.equal(kept.load_batch(range(len(kept)))[0], first)
    # a resumed run (a new process, the same data and size) finds the same copy
    reopened = plain.with_decoded_copy(tmp_path / "decoded")
    assert reopened.decoded.directory == kept.decoded.directory and reopened.decoded.written() == len(kept)


def test_a_torn_row_is_decoded_again(digits_folder, tmp_path):
    dataset = open_dataset(digits_folder, progress=False).with_decoded_copy(tmp_path / "decoded")
    image = dataset.load_image(7)
    pixels = np.load(dataset.decoded.directory / "pixels.npy", mmap_mode="r+")
    pixels[7, 0, 0, 0] ^= 0xFF  # a write the disk lost half of
    pixels.flush()
    del pixels
    assert dataset.decoded.get(7) is None and torch.equal(dataset.load_image(7), image)
    assert torch.equal(dataset.decoded.get(7), image)  # stored again, whole


def test_workers_fill_one_shared_copy(digits_folder, tmp_path):
    dataset = open_dataset(digits_folder, progress=False).with_decoded_copy(tmp_path / "decoded")
    order = np.random.default_rng(0).permutation(len(dataset))
    loaded = torch.cat([images for images, _, _ in iterate_batches(dataset, order, 64, workers=2)])
    assert dataset.decoded.written() == len(dataset)  # written by the worker processes, seen by this one
    assert torch.equal(torch.stack([dataset.decoded.get(int(i)) for i in order]), loaded)


def test_the_plan_keeps_a_copy_only_when_it_pays_and_fits(tmp_path, monkeypatch):
    need = copy_bytes(1000, (64, 64))
    assert decoded_copy_plan("auto", 1, 1000, (64, 64), tmp_path) == (False, None)  # read once: nothing to save
    assert decoded_copy_plan("off", 17, 1000, (64, 64), tmp_path) == (False, None)
    keep, note = decoded_copy_plan("auto", 17, 1000, (64, 64), tmp_path)
    assert keep and "12 MB at 64x64" in note and "removed at the end" in note
    disk = type("Usage", (), {"free": need + 1})
    monkeypatch.setattr("shutil.disk_usage", lambda path: disk)
    keep, note = decoded_copy_plan("auto", 17, 1000, (64, 64), tmp_path)
    assert not keep and "more than half" in note
    assert decoded_copy_plan("on", 17, 1000, (64, 64), tmp_path)[0]  # asked for, and it fits
    disk.free = need - 1
    with pytest.raises(DataError, match="the copy needs 12 MB"):
        decoded_copy_plan("on", 17, 1000, (64, 64), tmp_path)


def test_space_that_cannot_be_reserved_means_no_copy_or_an_error_when_asked_for(digits_folder, tmp_path, monkeypatch):
    def full_disk(fd, offset, size):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full_disk)
    dataset = open_dataset(digits_folder, progress=False)
    declined = keep_decoded(dataset, tmp_path, "auto", passes=3)
    assert declined.decoded is None and "No space left on device" in declined.notes[-1]
    assert not list((tmp_path / "decoded").iterdir())  # no half-made copy left behind
    with pytest.raises(DataError, match="cannot reserve the copy"):
        keep_decoded(dataset, tmp_path, "on", passes=3)


def test_a_scan_with_the_copy_gives_the_same_scores_and_removes_it(digits_folder, tmp_path):
    runs = {}
    for mode in ("on", "off"):
        result = sanitize.scan(digits_folder, tmp_path / mode, decoded_cache=mode, seed=1, **FAST)
        with open(result.files["scores"]) as handle:
            runs[mode] = (list(csv.reader(handle)), json.loads(result.files["summary"].read_text())["data"]["notes"])
    assert runs["on"][0] == runs["off"][0]
    assert any("decoded images kept" in note for note in runs["on"][1])
    assert not any("decoded" in note for note in runs["off"][1])
    assert not list((tmp_path / "on" / "decoded").iterdir())  # removed when the scan finished


def test_training_that_fills_the_copy_says_its_length_again_once_it_reads_the_copy(digits_folder, tmp_path, capsys):
    dataset = open_dataset(digits_folder, progress=False).with_decoded_copy(tmp_path / "decoded")
    model = create_model("tiny", 10, (3, 16, 16))
    config = TrainConfig(epochs=3, batch_size=16, augment=False)
    train_model(model, dataset, np.arange(len(dataset)), config, torch.device("cpu"), None, progress=True, desc="proxy")
    lines = [line.strip() for line in capsys.readouterr().err.splitlines() if "proxy: about" in line]
    estimate = r"proxy: about \d+(\.\d)? (s|min|h) for"
    assert len(lines) == 2
    assert re.fullmatch(estimate + r" 3 epochs \(at most: later epochs read decoded images\)", lines[0])
    assert re.fullmatch(estimate + r" the other 2 epochs, reading decoded images", lines[1])
