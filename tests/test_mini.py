"""The embedded mini benchmark's generator (needs Debian's dataset-fashion-mnist, as `make test` installs;
``FMNIST_DIR`` in the environment points elsewhere)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from provpt.data import mini, vtab
from provpt.data.cache import load_split, prepare_vtab_task

FMNIST = os.environ.get("FMNIST_DIR", mini.DEFAULT_FMNIST_DIR)
SIZES = {"train800": 12, "val200": 6, "test": 10}
SPLITS = ("train800", "val200", "train800val200", "test")


def tree_hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mini") / "raw"
    assert mini.generate(root, FMNIST, seed=0, sizes=SIZES) == list(mini.MINI_TASKS)
    return root


def test_task_table():
    groups = [g for g, _ in mini.MINI_TASKS.values()]
    assert len(mini.MINI_TASKS) >= 6 and set(groups) == set(vtab.GROUPS)
    assert groups == sorted(groups, key=vtab.GROUPS.index)  # natural, specialized, structured
    assert all(c >= 2 for _, c in mini.MINI_TASKS.values())
    assert set(mini.DESCRIPTIONS) == set(mini.MINI_TASKS) == set(mini.TASKS)


@pytest.mark.parametrize("task", list(mini.MINI_TASKS))
def test_layout_sizes_labels(generated, task):
    num_classes = mini.MINI_TASKS[task][1]
    items = {s: vtab.read_split(generated, task, s, num_classes=num_classes) for s in SPLITS}
    for split, n in SIZES.items():
        assert len(items[split]) == n
    assert items["train800val200"] == items["train800"] + items["val200"]
    for path, label in items["test"] + items["train800val200"]:
        assert path.suffix == ".png" and 0 <= label < num_classes
        with Image.open(path) as im:
            assert im.mode == "RGB" and im.size == (mini.SIZE, mini.SIZE)
    info = json.loads((generated / task / "mini.json").read_text())
    assert info["task"] == task and info["num_classes"] == num_classes and info["seed"] == 0


@pytest.mark.parametrize("task", list(mini.MINI_TASKS))
def test_splits_disjoint_in_content(generated, task):
    seen = {}
    for split in ("train800", "val200", "test"):
        for path, _ in vtab.read_split(generated, task, split, num_classes=mini.MINI_TASKS[task][1]):
            h = hashlib.sha256(np.asarray(Image.open(path)).tobytes()).hexdigest()
            assert seen.setdefault(h, split) == split, f"{path} also in {seen[h]}"


def test_sources_disjoint_and_from_fmnist_test(generated):
    digits = json.loads((generated / "digits" / "mini.json").read_text())["provenance"]
    idx = [set(digits[s]["indices"]) for s in ("train800", "val200", "test")]
    assert not (idx[0] & idx[1] or idx[0] & idx[2] or idx[1] & idx[2])
    for task in mini.STRUCTURED:
        prov = json.loads((generated / task / "mini.json").read_text())["provenance"]
        items = [set(prov[s]["items"]) for s in ("train800", "val200", "test")]
        assert all(p["source"] == "fashion-mnist t10k (test split)" for p in prov.values())
        assert all(i and max(i) < 10000 and min(i) >= 0 for i in items)
        assert not (items[0] & items[1] or items[0] & items[2] or items[1] & items[2])


def test_structured_tasks_never_read_the_training_split(tmp_path):
    only_test = tmp_path / "fmnist"
    only_test.mkdir()
    for name in mini.FMNIST_FILES["test"]:
        (only_test / name).symlink_to(Path(FMNIST).resolve() / name)
    mini.generate(tmp_path / "raw", only_test, sizes=SIZES, tasks=list(mini.STRUCTURED))
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte.gz"):
        mini.load_fashion_mnist(only_test, "train")


def test_deterministic(generated, tmp_path):
    tasks = ["digits", "textures", "count"]
    mini.generate(tmp_path / "a", FMNIST, seed=0, sizes=SIZES, tasks=tasks)
    mini.generate(tmp_path / "b", FMNIST, seed=1, sizes=SIZES, tasks=tasks)
    for task in tasks:
        same, other = tree_hashes(generated / task), tree_hashes(tmp_path / "a" / task)
        assert same == other and len(same) == sum(SIZES.values()) + 5
        different = tree_hashes(tmp_path / "b" / task)
        images = [k for k in same if k.endswith(".png")]
        assert sum(same[k] != different[k] for k in images) > 0.9 * len(images)


def test_idempotent_and_regenerates_on_new_seed(tmp_path):
    root = tmp_path / "raw"
    mini.generate(root, FMNIST, seed=0, sizes=SIZES, tasks="xpos")
    before = {p: p.stat().st_mtime_ns for p in (root / "xpos").rglob("*")}
    mini.generate(root, FMNIST, seed=0, sizes=SIZES, tasks="xpos")
    assert {p: p.stat().st_mtime_ns for p in (root / "xpos").rglob("*")} == before
    mini.generate(root, FMNIST, seed=3, sizes=SIZES, tasks="xpos")
    assert json.loads((root / "xpos" / "mini.json").read_text())["seed"] == 3
    (root / "xpos" / "test.txt").unlink()  # an incomplete folder is made again
    mini.generate(root, FMNIST, seed=3, sizes=SIZES, tasks="xpos")
    assert len(vtab.read_split(root, "xpos", "test", num_classes=8)) == SIZES["test"]
    assert [p.name for p in root.iterdir()] == ["xpos"]  # no temporary folders left


def test_prepared_by_the_vtab_cache(generated, tmp_path):
    group, classes = mini.MINI_TASKS["rot"]
    out = prepare_vtab_task(generated, "rot", tmp_path / "cache", size=mini.SIZE, num_classes=classes,
                            group=group, progress=False)
    images, labels = load_split(out, "test")
    assert images.shape == (SIZES["test"], 3, mini.SIZE, mini.SIZE) and labels.max() < classes


def test_missing_fashion_mnist_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        mini.generate(tmp_path / "raw", tmp_path / "nowhere", sizes=SIZES, tasks=["count"])
    msg = str(e.value)
    assert "t10k-images-idx3-ubyte.gz" in msg and "dataset-fashion-mnist" in msg and "mini.fmnist_dir" in msg
    assert not (tmp_path / "raw" / "count").exists()


def test_fashion_mnist_reader():
    x, y = mini.load_fashion_mnist(FMNIST, "test")
    assert x.shape == (10000, 28, 28) and x.dtype == np.uint8 and x.flags.writeable
    assert y.shape == (10000,) and set(np.unique(y)) == set(range(10))


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown mini task"):
        mini.generate(tmp_path, FMNIST, tasks=["cifar"])
    with pytest.raises(ValueError, match="unknown split"):
        mini.generate(tmp_path, FMNIST, sizes={"train": 3})
