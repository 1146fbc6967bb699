import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from provpt.data import (NORMALISATION, SPLITS, DataError, load_split, prepare_fgvc, prepare_split,
                         prepare_vtab_task, read_manifest, vtab)
from provpt.data.cache import decode_image

SIZE = 8


@pytest.fixture
def vtab_cache(noah_root, tmp_path):
    return prepare_vtab_task(noah_root, "toy", tmp_path / "cache", size=SIZE, num_classes=3, progress=False)


def _mtimes(task_dir):
    return {p.name: p.stat().st_mtime_ns for p in task_dir.glob("*.npy")}


def test_round_trip(noah_root, noah_splits, vtab_cache):
    assert vtab_cache.name == "toy"
    for split in SPLITS:
        images, labels = load_split(vtab_cache, split, verify=True)
        n = len(noah_splits[split])
        assert images.shape == (n, 3, SIZE, SIZE) and images.dtype == np.uint8 and images.flags.c_contiguous
        assert labels.dtype == np.int64 and labels.tolist() == [lab for *_, lab in noah_splits[split]]
        for (path, _), img in zip(vtab.read_split(noah_root, "toy", split, 3), images):
            expected = np.asarray(Image.open(path).convert("RGB").resize((SIZE, SIZE), Image.BILINEAR))
            np.testing.assert_array_equal(img, expected.transpose(2, 0, 1))
    gray = load_split(vtab_cache, "train800")[0][1]  # the "L" image
    assert (gray[0] == gray[1]).all() and (gray[1] == gray[2]).all()
    assert not (load_split(vtab_cache, "train800")[0][0][0] == load_split(vtab_cache, "train800")[0][0][1]).all()


def test_manifest(noah_root, noah_splits, vtab_cache):
    m = read_manifest(vtab_cache)
    assert (m["task"], m["kind"], m["group"], m["num_classes"], m["norm"]) == ("toy", "vtab", "custom", 3, "vtab")
    assert (tuple(m["mean"]), tuple(m["std"])) == NORMALISATION["vtab"]
    assert list(m["splits"]) == sorted(SPLITS)
    e = m["splits"]["train800"]
    assert e["n"] == 4 and e["label_counts"] == [2, 1, 1] and e["size"] == SIZE and e["fit"] == "squash"
    assert e["files"] == [f"images/train800/{n}" for n, *_ in noah_splits["train800"]]
    assert e["sources"][0]["file"] == "train800.txt"
    images = np.load(vtab_cache / e["images"])
    labels = np.load(vtab_cache / e["labels"])
    assert e["images_sha256"] == hashlib.sha256(images.tobytes()).hexdigest()
    assert e["labels_sha256"] == hashlib.sha256(labels.tobytes()).hexdigest()
    assert str(noah_root) not in (vtab_cache / "manifest.json").read_text()  # relative names only
    assert not list(vtab_cache.glob(".*.tmp"))


def test_second_prepare_skips_and_changed_split_is_redone(noah_root, vtab_cache):
    before = _mtimes(vtab_cache)
    prepare_vtab_task(noah_root, "toy", vtab_cache.parent, size=SIZE, num_classes=3, progress=False)
    assert _mtimes(vtab_cache) == before
    f = noah_root / "toy" / "val200.txt"
    f.write_text(f.read_text().replace("000000.jpg 1", "000000.jpg 2"))
    prepare_vtab_task(noah_root, "toy", vtab_cache.parent, size=SIZE, num_classes=3, progress=False)
    after = _mtimes(vtab_cache)
    assert {k for k in after if after[k] != before[k]} == {"val200.images.npy", "val200.labels.npy"}
    assert load_split(vtab_cache, "val200")[1].tolist() == [2, 0]


def test_resume_redoes_only_unfinished_splits(noah_root, tmp_path):
    out = tmp_path / "cache"
    task_dir = prepare_vtab_task(noah_root, "toy", out, size=SIZE, num_classes=3, splits=("train800",), progress=False)
    before = _mtimes(task_dir)
    (task_dir / ".test.images.npy.tmp").write_bytes(b"half")  # what a killed job leaves
    prepare_vtab_task(noah_root, "toy", out, size=SIZE, num_classes=3, progress=False)
    after = _mtimes(task_dir)
    assert after["train800.images.npy"] == before["train800.images.npy"] and len(after) == 8
    assert not list(task_dir.glob(".*.tmp"))


def test_corrupt_image_names_path_and_line(noah_root, image_writer, tmp_path):
    img = noah_root / "toy" / "images" / "test" / "000002.jpg"
    image_writer(img, seed=1, size=(64, 64))
    img.write_bytes(img.read_bytes()[: img.stat().st_size // 2])  # truncated JPEG
    with pytest.raises(DataError) as e:
        prepare_vtab_task(noah_root, "toy", tmp_path / "cache", size=SIZE, num_classes=3, workers=2, progress=False)
    assert str(img) in str(e.value) and "test.txt:3" in str(e.value)
    task_dir = tmp_path / "cache" / "toy"
    assert "test" not in read_manifest(task_dir)["splits"] and not (task_dir / "test.images.npy").exists()
    assert not list(task_dir.glob(".*.tmp"))
    img.write_bytes(b"not an image at all")
    with pytest.raises(DataError, match="cannot decode image"):
        prepare_vtab_task(noah_root, "toy", tmp_path / "cache", size=SIZE, num_classes=3, progress=False)


def test_verify_detects_tampering(vtab_cache):
    path = vtab_cache / "test.images.npy"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    load_split(vtab_cache, "test")  # shapes still fit: only verify can tell
    with pytest.raises(DataError, match="test.images.npy: sha256 .* differs"):
        load_split(vtab_cache, "test", verify=True)


def test_missing_cache_says_how_to_make_it(vtab_cache, tmp_path):
    with pytest.raises(DataError, match="manifest.json missing.*provpt prepare"):
        load_split(tmp_path / "nowhere", "test")
    m = read_manifest(vtab_cache)
    del m["splits"]["val200"]
    (vtab_cache / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match="'val200' is not prepared.*provpt prepare"):
        load_split(vtab_cache, "val200")
    (vtab_cache / "test.labels.npy").unlink()
    with pytest.raises(DataError, match="test.labels.npy.*provpt prepare"):
        load_split(vtab_cache, "test")


def test_fgvc_cache(fgvc_root, tmp_path):
    task_dir = prepare_fgvc(fgvc_root, "toybirds", tmp_path / "cache", size=SIZE, image_dir="images", progress=False)
    m = read_manifest(task_dir)
    assert (m["kind"], m["num_classes"], m["classes"], m["norm"]) == ("fgvc", 3, [5, 17, 42], "imagenet")
    assert m["splits"]["train"]["files"][0] == "images/a/1.jpg"
    train, val, test = (load_split(task_dir, s, verify=True) for s in ("train", "val", "test"))
    assert train[1].tolist() == [1, 0, 1] and test[1].tolist() == [2, 1]
    tv_images, tv_labels = load_split(task_dir, "trainval", verify=True)
    np.testing.assert_array_equal(tv_images, np.concatenate([train[0], val[0]]))
    assert tv_labels.tolist() == [1, 0, 1, 0] and m["splits"]["trainval"]["label_counts"] == [2, 2, 0]
    assert not (task_dir / "trainval.images.npy").exists()


def test_center_fit_matches_shorter_side_resize_and_center_crop(image_writer, tmp_path):
    path = image_writer(tmp_path / "wide.png", seed=3, size=(40, 20))
    got = decode_image(path, 10, fit="center")
    ref = Image.open(path).convert("RGB").resize((20, 10), Image.BILINEAR).crop((5, 0, 15, 10))
    np.testing.assert_array_equal(got, np.asarray(ref).transpose(2, 0, 1))


def test_prepare_split_direct(noah_root, tmp_path):
    items = vtab.read_split(noah_root, "toy", "test", num_classes=3)
    entry = prepare_split(items, tmp_path / "out", "test", 4, root=noah_root / "toy", workers=0, progress=False)
    assert entry["files"][0] == "images/test/000000.jpg" and entry["label_counts"] == [0, 1, 2]
    with pytest.raises(DataError, match="fit="):
        prepare_split(items, tmp_path / "out", "test", 4, fit="stretch", progress=False)
