import json

import pytest

from provpt.data import FGVC_DATASETS, DataError, fgvc


def test_table():
    assert FGVC_DATASETS == {"cub": 200, "nabirds": 555, "oxford_flowers": 102, "stanford_dogs": 120,
                             "stanford_cars": 196}


def test_remap_is_shared_sorted_union(fgvc_root, fgvc_splits):
    expected_map = {5: 0, 17: 1, 42: 2}
    for split, entries in fgvc_splits.items():
        items, cmap = fgvc.read_split(fgvc_root, split, image_dir="images")
        assert cmap == expected_map
        assert items == [(fgvc_root / "images" / rel, expected_map[c]) for rel, c in entries.items()]
    trainval, _ = fgvc.read_split(fgvc_root, "trainval", image_dir="images")
    train, _ = fgvc.read_split(fgvc_root, "train", image_dir="images")
    val, _ = fgvc.read_split(fgvc_root, "val", image_dir="images")
    assert trainval == train + val


def test_paths_relative_to_root_also_work(fgvc_root, fgvc_splits):
    for split, entries in fgvc_splits.items():
        (fgvc_root / f"{split}.json").write_text(json.dumps({f"images/{k}": v for k, v in entries.items()}))
    items, _ = fgvc.read_split(fgvc_root, "test", image_dir="images")
    assert items[0][0] == fgvc_root / "images" / "c" / "5.jpg"


def test_named_dataset_checks_class_count(fgvc_root):
    with pytest.raises(DataError, match="cub has 200 classes.* 3 distinct"):
        fgvc.read_split(fgvc_root, "train", name="cub")
    with pytest.raises(DataError, match="unknown FGVC dataset 'birds'"):
        fgvc.read_split(fgvc_root, "train", name="birds")
    with pytest.raises(DataError, match="unknown FGVC split 'train800'"):
        fgvc.read_split(fgvc_root, "train800")


def test_missing_json(fgvc_root):
    (fgvc_root / "val.json").unlink()
    with pytest.raises(DataError) as e:
        fgvc.read_split(fgvc_root, "train", image_dir="images")  # the class map needs all three files
    assert str(fgvc_root / "val.json") in str(e.value) and "{train,val,test}.json" in str(e.value)


@pytest.mark.parametrize("text, where, what", [
    ('["a/1.jpg", 17]', "train.json:1:", "expected a JSON object"),
    ('{\n "a/1.jpg": 17,\n "a/2.jpg": "5"\n}', "train.json:3:", "integer class id"),
    ('{\n "a/1.jpg": true\n}', "train.json:2:", "integer class id"),
    ('{\n "a/1.jpg": 17,\n "a/2.jpg": 5.0\n}', "train.json:3:", "integer class id"),
    ('{\n "a/1.jpg": 17,\n "a/2.jpg" 5\n}', "train.json:3:", "not valid JSON"),
    ('{\n "a/1.jpg": 17,\n "a/1.jpg": 5\n}', "train.json:", "duplicate key"),
    ("{}", "train.json:", "empty split"),
])
def test_malformed_json(fgvc_root, text, where, what):
    (fgvc_root / "train.json").write_text(text)
    with pytest.raises(DataError) as e:
        fgvc.read_split(fgvc_root, "test", image_dir="images")
    assert where in str(e.value) and what in str(e.value)


def test_missing_image(fgvc_root):
    (fgvc_root / "train.json").write_text('{\n "a/1.jpg": 17,\n "a/nope.jpg": 5\n}')
    with pytest.raises(DataError) as e:
        fgvc.read_split(fgvc_root, "train", image_dir="images")
    assert "train.json:3:" in str(e.value) and str(fgvc_root / "images" / "a" / "nope.jpg") in str(e.value)
