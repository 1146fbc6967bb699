from pathlib import Path

import pytest

from provpt.data import SPLITS, VTAB_TASKS, DataError, vtab


def test_task_table():
    assert len(VTAB_TASKS) == 19
    groups = [g for g, _ in VTAB_TASKS.values()]
    assert (groups.count("natural"), groups.count("specialized"), groups.count("structured")) == (7, 4, 8)
    assert VTAB_TASKS["cifar"] == ("natural", 100) and VTAB_TASKS["sun397"] == ("natural", 397)
    assert VTAB_TASKS["smallnorb_ele"] == ("structured", 9) and VTAB_TASKS["patch_camelyon"][1] == 2
    assert sum(c for _, c in VTAB_TASKS.values()) == 102 + 100 + 47 + 102 + 37 + 10 + 397 + 2 + 10 + 45 + 5 + 8 + 6 + 6 + 4 + 16 + 16 + 18 + 9
    assert SPLITS == ("train800", "val200", "train800val200", "test")


@pytest.mark.parametrize("split", SPLITS)
def test_read_split(noah_root, noah_splits, split):
    items = vtab.read_split(noah_root, "toy", split, num_classes=3)
    expected = [(noah_root / "toy" / "images" / split / n, lab) for n, _, lab in noah_splits[split]]
    assert items == expected
    assert all(isinstance(p, Path) and type(lab) is int for p, lab in items)
    assert items[0].where.endswith(f"{split}.txt:1")


def test_blank_lines_and_missing_classes_are_fine(noah_root):
    f = noah_root / "toy" / "val200.txt"
    f.write_text("\n" + f.read_text() + "\n\n")
    items = vtab.read_split(noah_root, "toy", "val200", num_classes=3)
    assert [lab for _, lab in items] == [1, 0]  # class 2 absent: fine
    assert items[0].where.endswith("val200.txt:2")


def test_known_task_uses_table(noah_root):
    (noah_root / "toy").rename(noah_root / "kitti")
    assert len(vtab.read_split(noah_root, "kitti", "test")) == 3  # 4 classes from the table


def test_unknown_task_needs_num_classes(noah_root):
    with pytest.raises(DataError, match="unknown VTAB task 'toy'.*cifar.*smallnorb_ele"):
        vtab.read_split(noah_root, "toy", "train800")


def test_missing_split_file(noah_root):
    (noah_root / "toy" / "test.txt").unlink()
    with pytest.raises(DataError) as e:
        vtab.read_split(noah_root, "toy", "test", num_classes=3)
    msg = str(e.value)
    assert str(noah_root / "toy" / "test.txt") in msg and "train800val200" in msg and "<label>" in msg


@pytest.mark.parametrize("bad", ["images/train800/000001.jpg", "images/train800/000001.jpg one",
                                 "images/train800/000001.jpg 1.5", "images/train800/000001.jpg 1_0", "7"])
def test_unparsable_line(noah_root, bad):
    f = noah_root / "toy" / "train800.txt"
    lines = f.read_text().splitlines()
    lines[1] = bad
    f.write_text("\n".join(lines))
    with pytest.raises(DataError) as e:
        vtab.read_split(noah_root, "toy", "train800", num_classes=3)
    assert f"{f}:2: expected '<relative path> <integer label>', got {bad!r}" in str(e.value)


@pytest.mark.parametrize("label", [3, -1])
def test_label_out_of_range(noah_root, label):
    f = noah_root / "toy" / "test.txt"
    f.write_text(f.read_text().replace("000002.jpg 1", f"000002.jpg {label}"))
    with pytest.raises(DataError) as e:
        vtab.read_split(noah_root, "toy", "test", num_classes=3)
    msg = str(e.value)
    assert f"{f}:3:" in msg and f"label {label}" in msg and "3 classes" in msg and "'toy'" in msg


def test_missing_image(noah_root):
    img = noah_root / "toy" / "images" / "val200" / "000001.png"
    img.unlink()
    with pytest.raises(DataError) as e:
        vtab.read_split(noah_root, "toy", "val200", num_classes=3)
    assert "val200.txt:2:" in str(e.value) and str(img) in str(e.value)


def test_empty_split(noah_root):
    (noah_root / "toy" / "val200.txt").write_text("\n  \n")
    with pytest.raises(DataError, match="val200.txt: empty split"):
        vtab.read_split(noah_root, "toy", "val200", num_classes=3)
