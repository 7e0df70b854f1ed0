"""WebDataset tar shards as DATA: read member by member with ids shard/key, every unusable member a recorded skip
(the same as an ImageFolder's), a damaged shard keeps what precedes the damage, and a scan runs on them as on a
folder."""

import io
import json
import tarfile
import tempfile
from pathlib import Path

import numpy as np
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from sanitize.cli import cli
from sanitize.data import ShardDataset, open_dataset
from sanitize.data.shards import split_key
from sanitize.errors import DataError


def _encoded(image: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt)
    return buffer.getvalue()


def _add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def write_shards(root: Path, x: np.ndarray, y: np.ndarray, shards: int = 2, extra=None) -> Path:
    """x split over `shards` tar files, PNG and JPEG members alternately, each with its .cls; `extra(archive, s)` adds
    members to shard s."""
    root.mkdir(parents=True, exist_ok=True)
    for s, part in enumerate(np.array_split(np.arange(len(x)), shards)):
        with tarfile.open(root / f"train-{s:03d}.tar", "w") as archive:
            for i in part:
                fmt, suffix = ("PNG", "png") if i % 2 == 0 else ("JPEG", "jpg")
                _add(archive, f"{i:06d}.{suffix}", _encoded(x[i], fmt))
                _add(archive, f"{i:06d}.cls", str(int(y[i])).encode())
            if extra:
                extra(archive, s)
    return root


def test_shards_read_with_ids_shard_slash_key_and_their_labels(tmp_path, digits16):
    x, y = digits16
    root = write_shards(tmp_path / "shards", x[:60], y[:60])
    dataset = open_dataset(root, progress=False)
    assert isinstance(dataset, ShardDataset) and dataset.kind == "shards" and not dataset.skipped
    assert dataset.ids[:2] == ["train-000/000000", "train-000/000001"] and dataset.ids[-1] == "train-001/000059"
    assert dataset.labels.tolist() == y[:60].tolist() and dataset.classes == [str(c) for c in range(10)]
    assert np.array_equal(dataset.load_image(0).permute(1, 2, 0).numpy(), x[0])  # PNG: lossless
    images, labels, _ = dataset.load_batch([1, 59])
    assert images.shape == (2, 3, 16, 16) and labels.tolist() == [y[1], y[59]]
    single = open_dataset(root / "train-001.tar", progress=False)
    assert len(single) == 30 and single.ids[0] == "train-001/000030"
    assert open_dataset(root, progress=False).fingerprint == dataset.fingerprint


def test_every_unusable_member_is_a_recorded_skip(tmp_path, digits16):
    x, y = digits16

    def hostile(archive, s):
        if s:
            return
        _add(archive, "nolabel.png", _encoded(x[0], "PNG"))
        _add(archive, "nolabel2.cls", b"3")  # a label without an image
        _add(archive, "badlabel.png", _encoded(x[0], "PNG"))
        _add(archive, "badlabel.cls", b"three")
        _add(archive, "garbage.jpg", b"\xff\xd8\xff\xe0 not really")
        _add(archive, "garbage.cls", b"1")
        _add(archive, "twice.png", _encoded(x[0], "PNG"))
        _add(archive, "twice.jpg", _encoded(x[0], "JPEG"))
        _add(archive, "twice.cls", b"1")
        link = tarfile.TarInfo("link.png")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        archive.addfile(link)
        _add(archive, "link.cls", b"1")
        _add(archive, "bad\nname.png", _encoded(x[0], "PNG"))
        _add(archive, "bad\nname.cls", b"1")
        _add(archive, "000000.json", b"{}")  # metadata beside an example: ignored, noted

    root = write_shards(tmp_path / "shards", x[:20], y[:20], extra=hostile)
    dataset = open_dataset(root, progress=False)
    reasons = {s.id: s.reason for s in dataset.skipped}
    assert reasons["train-000/nolabel"] == "no .cls label member"
    assert reasons["train-000/nolabel2"] == "no image member"
    assert "not a class index" in reasons["train-000/badlabel"]
    assert "Error" in reasons["train-000/garbage"]  # the decoder's own words
    assert reasons["train-000/twice"] == "two image members under one key"
    assert reasons["train-000/link"] == "not a regular file in the shard"
    assert "control character" in reasons["train-000/bad\nname"]
    assert len(dataset) == 20 and any("1 member neither an image" in note for note in dataset.notes)


def test_a_damaged_shard_keeps_what_precedes_the_damage(tmp_path, digits16):
    x, y = digits16
    root = write_shards(tmp_path / "shards", x[:40], y[:40])
    whole = (root / "train-001.tar").read_bytes()
    (root / "train-001.tar").write_bytes(whole[: len(whole) // 2] + b"\x13" * 700)
    dataset = open_dataset(root, progress=False)
    assert 20 < len(dataset) < 40 and len(dataset) + len(dataset.skipped) <= 41
    assert any(s.id == "train-001" and "cannot be read" in s.reason for s in dataset.skipped)
    for index in range(len(dataset)):  # nothing kept reads past the damage
        assert dataset.load_image(index).shape == (3, 16, 16)


def test_a_folder_with_no_usable_shard_is_a_data_error(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.tar").write_bytes(b"")
    try:
        open_dataset(tmp_path / "empty", progress=False)
    except DataError as error:
        assert "no usable examples" in str(error)
    else:
        raise AssertionError("expected a DataError")


def test_webdataset_keys_end_at_the_first_dot_of_the_file_name():
    assert split_key("a/b.c/0001.seg.PNG") == ("a/b.c/0001", "seg.png")
    assert split_key("0001.cls") == ("0001", "cls")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(content=st.one_of(st.binary(max_size=4096), st.binary(max_size=600).map(lambda b: b"ustar".rjust(262) + b)))
def test_any_bytes_as_a_shard_are_a_recorded_skip_or_a_data_error(content):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fuzz.tar"
        path.write_bytes(content)
        try:
            dataset = open_dataset(path, progress=False)
        except DataError:
            return
        for index in range(len(dataset)):
            dataset.load_image(index)


def test_a_scan_of_shards_writes_the_same_outputs_with_shard_ids(tmp_path, digits16):
    x, y = digits16
    root = write_shards(tmp_path / "shards", x[:300], y[:300], shards=3)
    out = tmp_path / "scan"
    result = CliRunner().invoke(cli, ["scan", str(root), "--out", str(out), "--epochs", "8", "--quiet"])
    assert result.exit_code in (0, 1), result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"]["kind"] == "shards" and summary["data"]["examples"] == 300
    ids = [line.split(",")[0] for line in (out / "scores.csv").read_text().splitlines()[1:]]
    assert ids[0] == "train-000/000000" and len(ids) == 300
    assert (out / "report.html").exists()


def test_an_attack_on_shards_is_refused_before_it_crafts(tmp_path, digits16):
    x, y = digits16
    root = write_shards(tmp_path / "shards", x[:40], y[:40])
    np.savez(tmp_path / "test.npz", x=x[40:60], y=y[40:60])
    arguments = ["attack", str(root), "--test", str(tmp_path / "test.npz"), "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(cli, arguments)
    assert result.exit_code == 2 and "ImageFolder or .npz data, not shards" in result.output
