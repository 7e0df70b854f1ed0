import numpy as np
import pytest
import torch
from PIL import Image

from sanitize.data import VALIDATIONS, open_dataset
from sanitize.errors import DataError


def test_npz_with_x_y_and_grayscale(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, size=(20, 12, 10), dtype=np.uint8)
    y = np.arange(20) % 4
    path = tmp_path / "gray.npz"
    np.savez(path, x=x, y=y)
    dataset = open_dataset(path)
    images, labels, positions = dataset.load_batch([3, 5])
    assert images.shape == (2, 3, 12, 10) and images.dtype == torch.uint8
    assert torch.equal(images[0, 1], torch.from_numpy(x[3]))
    assert labels.tolist() == [3, 1] and positions.tolist() == [3, 5]
    assert dataset.ids[7] == "7" and dataset.paths[7] == "" and dataset.classes == ["0", "1", "2", "3"]


def test_npz_train_keys_rgba_and_class_names(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, size=(6, 8, 8, 4), dtype=np.uint8)
    path = tmp_path / "rgba.npz"
    np.savez(path, x_train=x, y_train=np.array([0, 1, 0, 1, 0, 1]), classes=np.array(["cat", "dog"]))
    dataset = open_dataset(path)
    assert dataset.classes == ["cat", "dog"]
    assert torch.equal(dataset.load_image(2), torch.from_numpy(x[2, ..., :3]).permute(2, 0, 1))


def test_same_arrays_same_fingerprint_and_different_arrays_differ(tmp_path, digits16):
    x, y = digits16
    np.savez(tmp_path / "a.npz", x=x, y=y)
    np.savez_compressed(tmp_path / "b.npz", x=x, y=y)
    x2 = x.copy()
    x2[0, 0, 0, 0] ^= 1
    np.savez(tmp_path / "c.npz", x=x2, y=y)
    fingerprints = [open_dataset(tmp_path / f"{n}.npz").fingerprint for n in "abc"]
    assert fingerprints[0] == fingerprints[1] != fingerprints[2]


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"images": np.zeros((2, 4, 4, 3), np.uint8)}, "expected x and y"),
        ({"x": np.zeros((2, 4, 4, 3), np.float32), "y": np.zeros(2, int)}, "uint8"),
        ({"x": np.zeros((2, 4, 4, 3), np.uint8), "y": np.zeros(3, int)}, "labels must be"),
        ({"x": np.zeros((2, 4, 4, 3), np.uint8), "y": np.array([0, -1])}, "non-negative"),
        (
            {
                "x": np.zeros((2, 4, 4, 3), np.uint8),
                "y": np.array([0, 1]),
                "classes": np.array([{"a": 1}], dtype=object),
            },
            "Python objects",
        ),
    ],
)
def test_bad_npz_is_a_data_error(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=message):
        open_dataset(path)


def test_not_an_npz_is_a_data_error(tmp_path):
    path = tmp_path / "junk.npz"
    path.write_bytes(b"not a zip file at all")
    with pytest.raises(DataError, match="not an .npz archive"):
        open_dataset(path)
    with pytest.raises(DataError, match="does not exist"):
        open_dataset(tmp_path / "missing")


def test_folder_records_bad_files_and_keeps_going(digits_folder):
    (digits_folder / "digit_3" / "empty.png").write_bytes(b"")
    (digits_folder / "digit_3" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    good = (digits_folder / "digit_4").glob("*.png").__next__().read_bytes()
    (digits_folder / "digit_4" / "truncated.png").write_bytes(good[: len(good) // 2])
    (digits_folder / "digit_4" / "notes.txt").write_text("not an image")
    (digits_folder / "digit_5" / "dangling.png").symlink_to(digits_folder / "nowhere.png")
    (digits_folder / "empty_class").mkdir()
    dataset = open_dataset(digits_folder, progress=False)
    reasons = {s.id: s.reason for s in dataset.skipped}
    assert set(reasons) == {"digit_3/empty.png", "digit_3/corrupt.jpg", "digit_4/truncated.png", "digit_5/dangling.png"}
    assert "empty file" in reasons["digit_3/empty.png"]
    assert all(reasons.values())
    assert len(dataset) == 400
    assert dataset.class_counts()["empty_class"] == 0
    assert any("ignored" in note for note in dataset.notes)
    images, labels, _ = dataset.load_batch(range(len(dataset)))
    assert images.shape == (400, 3, 16, 16)
    assert [dataset.classes[c] for c in labels[:1]] == [dataset.ids[0].split("/")[0]]


def test_folder_converts_modes_and_resizes_odd_sizes(digits_folder):
    Image.new("L", (16, 16), 200).save(digits_folder / "digit_1" / "gray.png")
    Image.new("RGBA", (16, 16), (10, 20, 30, 40)).save(digits_folder / "digit_1" / "rgba.png")
    Image.new("P", (40, 24)).save(digits_folder / "digit_2" / "big_palette.gif")
    nested = digits_folder / "digit_2" / "more"
    nested.mkdir()
    Image.new("RGB", (16, 16), (1, 2, 3)).save(nested / "deep.bmp")
    dataset = open_dataset(digits_folder, progress=False)
    assert dataset.image_size == (16, 16)
    assert any("resized" in note for note in dataset.notes)
    by_id = {id_: i for i, id_ in enumerate(dataset.ids)}
    assert dataset.load_image(by_id["digit_1/gray.png"]).unique().tolist() == [200]
    assert dataset.load_image(by_id["digit_1/rgba.png"])[:, 0, 0].tolist() == [10, 20, 30]
    assert dataset.load_image(by_id["digit_2/big_palette.gif"]).shape == (3, 16, 16)
    assert dataset.load_image(by_id["digit_2/more/deep.bmp"])[:, 5, 5].tolist() == [1, 2, 3]
    # the 40 x 24 GIF is shrunk 1.5x: a note says what a downscale does to poisons; the 16 px images are not noted
    (shrunk,) = [note for note in dataset.notes if "downscaled" in note]
    assert shrunk.startswith("1 image downscaled (median 1.5x)") and "reports/imagenet-shaped" in shrunk
    halved = open_dataset(digits_folder, image_size=8, progress=False)
    assert any(note.startswith("404 images downscaled (median 2.0x)") for note in halved.notes)
    assert not any("downscaled" in note for note in open_dataset(digits_folder, image_size=32, progress=False).notes)


def test_folder_without_images_is_a_data_error(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="no image files"):
        open_dataset(tmp_path, progress=False)
    with pytest.raises(DataError, match="no class subfolders"):
        open_dataset(tmp_path / "a", progress=False)


def test_worker_processes_load_the_same_batches(digits_folder):
    from sanitize.data import iterate_batches

    single = open_dataset(digits_folder, progress=False)
    parallel = open_dataset(digits_folder, workers=2, progress=False)
    assert parallel.ids == single.ids and parallel.fingerprint == single.fingerprint
    order = np.random.default_rng(0).permutation(len(single))
    for (a, la, pa), (b, lb, pb) in zip(
        iterate_batches(single, order, 64), iterate_batches(parallel, order, 64, workers=2)
    ):
        assert torch.equal(a, b) and torch.equal(la, lb) and torch.equal(pa, pb)


def test_header_validation_finds_late_what_a_full_one_finds_up_front(digits_folder, tmp_path):
    (digits_folder / "digit_3" / "empty.png").write_bytes(b"")
    (digits_folder / "digit_3" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    good = next((digits_folder / "digit_4").glob("*.png")).read_bytes()
    (digits_folder / "digit_4" / "truncated.png").write_bytes(good[: len(good) // 2])
    full, header = (open_dataset(digits_folder, progress=False, validation=v) for v in VALIDATIONS)
    # the header check: the empty file and the garbage up front; the truncated PNG has a valid header
    assert {s.id for s in header.skipped} == {"digit_3/empty.png", "digit_3/corrupt.jpg"}
    assert len(header) == len(full) + 1 == 401
    truncated = header.ids.index("digit_4/truncated.png")
    with pytest.raises(DataError, match="truncated.png does not decode"):
        header.load_image(truncated)  # no folder to record it in: an error, never a silent black image
    recording = header.record_failures_in(tmp_path / "late")
    images, _, _ = recording.load_batch(range(len(recording)))  # the first pass: a black image in its place
    assert (
        images[truncated].max() == 0
        and int((images.flatten(1).amax(1) == 0).sum()) == 1
        and list(recording.late_failures()) == [truncated]
    )
    decoded, keep = recording.without_late_failures()
    assert keep.tolist() == [i for i in range(len(recording)) if i != truncated]
    assert decoded.ids == full.ids and decoded.fingerprint == full.fingerprint  # what a full validation keeps
    reasons = {s.id: s.reason for s in decoded.skipped}
    assert (
        set(reasons) == {s.id for s in full.skipped} and "found when first decoded" in reasons["digit_4/truncated.png"]
    )
    assert torch.equal(decoded.load_batch(range(len(decoded)))[0], full.load_batch(range(len(full)))[0])
    # a second process on the same data and folder (a resumed run) reads the record instead of decoding again
    again = open_dataset(digits_folder, progress=False, validation="header").record_failures_in(tmp_path / "late")
    assert again.late_failures() == recording.late_failures() and again.load_image(truncated).max() == 0


def test_data_of_which_nothing_decodes_is_a_data_error_after_a_header_validation(tmp_path):
    good = tmp_path / "source.png"
    noise = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(noise).save(good)
    for name in ("a", "b"):
        (tmp_path / "data" / name).mkdir(parents=True)
        (tmp_path / "data" / name / "cut.png").write_bytes(good.read_bytes()[:400])  # a whole header, half the pixels
    dataset = open_dataset(tmp_path / "data", progress=False, validation="header").record_failures_in(tmp_path / "late")
    assert dataset.load_batch([0, 1])[0].max() == 0
    with pytest.raises(DataError, match="none of the 2 image files decodes"):
        dataset.without_late_failures()
