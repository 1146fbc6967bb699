"""The paper profiles' data pipeline and baselines as the authors ran them: FGVC crops and flips per
image, FGVC final runs on train, VPT-Shallow without prompt dropout, the data recorded in every
results row."""

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from provpt.config import RunConfig, deep_merge, load_profile, resolve
from provpt.data.cache import prepare_fgvc, read_manifest
from provpt.data.task import TaskData, data_variant, random_crop_flip
from provpt.prepare import prepare
from provpt.train import run

ROOT = Path(__file__).resolve().parents[1]
CACHED, CROP = 20, 16  # a 20 px cached square cropped to 16, as 256 -> 224
ROOM = CACHED - CROP


def coded_task(n: int, precision: str = "fp64") -> TaskData:
    """``n`` images whose pixels say where they are: channel 0 the row, 1 the column, 2 the image."""
    rows = torch.arange(CACHED).view(1, CACHED, 1).expand(n, CACHED, CACHED)
    cols = torch.arange(CACHED).view(1, 1, CACHED).expand(n, CACHED, CACHED)
    ids = torch.arange(n).view(n, 1, 1).expand(n, CACHED, CACHED)
    x = torch.stack([rows, cols, ids], 1).to(torch.uint8)
    cfg = RunConfig.from_dict(dict(augment="fgvc", backbone_kwargs={"img_size": CROP}, norm="vtab", precision=precision))
    return TaskData(cfg, torch.device("cpu"), splits={"train": (x, torch.zeros(n, dtype=torch.int64))}, num_classes=2)


def decode(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(top, left, flipped) of each crop of :func:`coded_task`'s images, after checking that each
    output image is exactly its own image's crop (rows and columns consecutive)."""
    px = (out * 127.5 + 127.5).round().long()  # norm vtab: mean = std = 0.5
    n = len(px)
    assert (px[:, 2] == torch.arange(n).view(n, 1, 1)).all()  # every image cropped from itself
    top, left, right = px[:, 0, 0, 0], px[:, 1, 0, 0], px[:, 1, 0, -1]
    flipped = left > right
    left = torch.minimum(left, right)
    step = torch.arange(CROP)
    assert (px[:, 0] == (top[:, None] + step).view(n, CROP, 1)).all()
    cols = torch.where(flipped[:, None], left[:, None] + CROP - 1 - step, left[:, None] + step)
    assert (px[:, 1] == cols.view(n, 1, CROP)).all()
    return top, left, flipped


def test_fgvc_crops_and_flips_are_drawn_per_image():
    data = coded_task(64)
    top, left, flipped = decode(data.batch("train", torch.arange(64), True, torch.Generator().manual_seed(0))[0])
    assert len(set(zip(top.tolist(), left.tolist()))) > 10  # not one offset for the batch
    assert 0 < int(flipped.sum()) < 64  # nor one flip


def test_fgvc_crops_cover_torchvision_random_crop_range():
    from torchvision import transforms

    data, gen = coded_task(64), torch.Generator().manual_seed(1)
    tops, lefts, flips = [], [], []
    for _ in range(8):  # 512 images
        t, le, f = decode(data.batch("train", torch.arange(64), True, gen)[0])
        tops += t.tolist()
        lefts += le.tolist()
        flips += f.tolist()
    # torchvision's RandomCrop(16) on the same 20 px image: the offsets it can draw
    image = coded_task(1).splits["train"][0][0]
    torch.manual_seed(0)
    tv = [transforms.RandomCrop(CROP)(image) for _ in range(300)]
    tv_tops, tv_lefts = {int(c[0, 0, 0]) for c in tv}, {int(c[1, 0, 0]) for c in tv}
    assert tv_tops == tv_lefts == set(range(ROOM + 1))  # 0..room inclusive
    assert set(tops) == tv_tops and set(lefts) == tv_lefts  # every offset reached, none outside
    assert 0.4 < sum(flips) / len(flips) < 0.6  # RandomHorizontalFlip(0.5)


def test_random_crop_flip_equals_torchvision_functional_crop_and_flip():
    from torchvision.transforms import functional as TF

    x = torch.randint(0, 256, (5, 3, CACHED, CACHED + 3), dtype=torch.uint8)  # not square: both axes
    gen = torch.Generator().manual_seed(3)
    out = random_crop_flip(x, CROP, gen)
    gen = torch.Generator().manual_seed(3)  # the draws, in their order: tops, lefts, flips
    tops = torch.randint(0, CACHED - CROP + 1, (5,), generator=gen)
    lefts = torch.randint(0, CACHED + 3 - CROP + 1, (5,), generator=gen)
    flips = torch.rand(5, generator=gen) < 0.5
    for k in range(5):
        ref = TF.crop(x[k], int(tops[k]), int(lefts[k]), CROP, CROP)
        assert torch.equal(out[k], TF.hflip(ref) if flips[k] else ref)
    with pytest.raises(ValueError, match="crop 16 is larger than the images"):
        random_crop_flip(x[..., :10, :10], CROP)


def test_fgvc_augmentation_is_seeded():
    data = coded_task(32, precision="fp32")
    idx = torch.randperm(32)
    a = data.batch("train", idx, True, torch.Generator().manual_seed(5))[0]
    b = data.batch("train", idx, True, torch.Generator().manual_seed(5))[0]
    c = data.batch("train", idx, True, torch.Generator().manual_seed(6))[0]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_fgvc_eval_is_the_centre_crop():
    data = coded_task(8)
    top, left, flipped = decode(data.batch("train", torch.arange(8), False, torch.Generator().manual_seed(0))[0])
    assert top.tolist() == left.tolist() == [ROOM // 2] * 8 and not flipped.any()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fgvc_crops_are_the_same_on_cuda():
    cpu = coded_task(64, precision="fp32")
    cuda = TaskData(RunConfig.from_dict(dict(augment="fgvc", backbone_kwargs={"img_size": CROP}, norm="vtab")),
                    torch.device("cuda"), splits=cpu.splits, num_classes=2)
    x = cuda.batch("train", torch.arange(64, device="cuda"), True, torch.Generator().manual_seed(9))[0]
    assert torch.equal(x.cpu(), cpu.batch("train", torch.arange(64), True, torch.Generator().manual_seed(9))[0])


# ----------------------------------------------------------------------------- profiles


@pytest.mark.parametrize("profile, dataset", [("vtab1k", "cifar"), ("fgvc", "cub")])
@pytest.mark.parametrize("stage", ["search", "final"])
def test_paper_profiles_train_vpt_shallow_without_prompt_dropout(profile, dataset, stage):
    path = ROOT / "params" / f"{profile}.yaml"
    assert resolve(path, "vpt-shallow", stage, [f"dataset={dataset}"]).prompt_dropout == 0
    assert resolve(path, "vpt-deep", stage, [f"dataset={dataset}"]).prompt_dropout == 0.1
    assert resolve(path, "pro-vpt", stage, [f"dataset={dataset}"]).prompt_dropout == 0.1


def test_fgvc_final_runs_train_on_train_and_trainval_is_an_option(fgvc_root, tmp_path):
    path = ROOT / "params" / "fgvc.yaml"
    final = resolve(path, "vpt-deep", "final", ["dataset=cub"])
    assert (final.train_split, final.eval_splits) == ("train", ["test"])
    assert resolve(path, "vpt-deep", "search", ["dataset=cub"]).train_split == "train"
    over = deep_merge(load_profile(path), {"final": {"train_split": "trainval"}})  # --config final=...
    final = resolve(over, "vpt-deep", "final", ["dataset=cub"])
    assert (final.train_split, final.eval_splits) == ("trainval", ["test"])
    # `provpt prepare` of the profile prepares the splits of both settings
    src = tmp_path / "src" / "toy"  # <source>/<dataset>/{train,val,test}.json, paths relative to the folder
    src.mkdir(parents=True)
    (src / "images").symlink_to(fgvc_root / "images")
    for split in ("train", "val", "test"):
        entries = json.loads((fgvc_root / f"{split}.json").read_text())
        (src / f"{split}.json").write_text(json.dumps({f"images/{k}": v for k, v in entries.items()}))
    over = deep_merge(over, {"datasets": ["toy"], "train": {"data_root": str(tmp_path / "cache")},
                             "data": {"source": str(src.parent), "image_size": CACHED}})
    prepare(over)
    assert set(read_manifest(tmp_path / "cache" / "toy")["splits"]) == {"train", "val", "test", "trainval"}


# ----------------------------------------------------------------------------- the data of a results row


def test_data_variant_of_each_kind_of_cache(noah_root, fgvc_root, tmp_path):
    from provpt.data.cache import prepare_vtab_task

    assert data_variant(read_manifest(prepare_vtab_task(noah_root, "toy", tmp_path, 16, num_classes=3))) == "noah"
    fgvc = prepare_fgvc(fgvc_root, "toy_fgvc", tmp_path, 20, image_dir="images", progress=False)
    assert data_variant(read_manifest(fgvc)) == "vpt-json"
    assert data_variant({"kind": "vtab", "task": "count"}) == "mini"
    assert coded_task(2).variant == "synthetic"


def test_fgvc_run_records_its_data_and_resumes_with_per_image_crops(fgvc_root, tmp_path):
    prepare_fgvc(fgvc_root, "toy", tmp_path / "cache", CACHED, image_dir="images", progress=False)
    kw = dict(dataset="toy", data_root=str(tmp_path / "cache"), backbone="vit_tiny_patch16_224",
              backbone_kwargs=dict(img_size=CROP, patch_size=8, embed_dim=32, depth=2, num_heads=2),
              method="vpt-deep", num_prompts=2, epochs=3, batch_size=2, lr=0.5, augment="fgvc", norm="imagenet",
              train_split="train", eval_splits=["test"], progress=False, threads=1)
    full = run(RunConfig.from_dict({**kw, "out": str(tmp_path / "full")}))
    assert (full["data_variant"], full["norm"], full["train_split"]) == ("vpt-json", "imagenet", "train")

    class Killed(Exception):
        pass

    def kill(epoch):
        if epoch == 1:
            raise Killed

    with pytest.raises(Killed):
        run(RunConfig.from_dict({**kw, "out": str(tmp_path / "cut")}), on_epoch_end=kill)
    resumed = run(RunConfig.from_dict({**kw, "out": str(tmp_path / "cut")}))
    drop = ("wall_time_s",)
    assert {k: v for k, v in resumed.items() if k not in drop} == {k: v for k, v in full.items() if k not in drop}
    saved = json.loads((tmp_path / "full" / "metrics.json").read_text())
    assert saved["data_variant"] == "vpt-json"


def write_final_run(root: Path, task: str, method: str, seed: int, acc: float, **data) -> None:
    d = root / "runs" / "final" / task / method / f"seed{seed}"
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps({
        "dataset": task, "method": method, "seed": seed, "lr": 0.1, "weight_decay": 0.0, "epochs": 1,
        "eval": {"test": {"acc": acc, "loss": 1.0}}, "trainable_params": 1000, "total_params": 10_000,
        "wall_time_s": 1.0, "distribution": [1, 1], **data}))


def test_results_rows_and_published_table_say_which_data(tmp_path):
    from provpt.report.runs import collect_runs, collect_selections
    from provpt.report.tables import write_tables

    noah = dict(data_variant="noah", norm="vtab", train_split="train800val200")
    for seed in (18, 25):
        write_final_run(tmp_path, "cifar", "vpt-deep", seed, 70.0 + seed / 10, **noah)
        write_final_run(tmp_path, "dtd", "vpt-deep", seed, 60.0, **noah)
        write_final_run(tmp_path, "dtd", "linear", seed, 50.0)  # a metrics.json from before the field
    runs = collect_runs(tmp_path, "final", "test")
    assert set(runs.loc[runs["method"] == "vpt-deep", "data_variant"]) == {"noah"}
    write_tables(runs, collect_selections(tmp_path), {"natural": ["cifar", "dtd"]}, tmp_path / "tables")

    long = pd.read_csv(tmp_path / "tables" / "accuracy_long.csv", keep_default_na=False).set_index(["dataset", "method"])
    assert long.loc[("cifar", "vpt-deep"), ["data_variant", "norm", "train_split"]].tolist() == [
        "noah", "vtab", "train800val200"]
    assert long.loc[("dtd", "linear"), "data_variant"] == ""
    note = (tmp_path / "tables" / "accuracy.md").read_text()
    assert "data: noah, vtab norm, trained on train800val200; not recorded (noah: VTAB-1k" in note

    pub = pd.read_csv(tmp_path / "tables" / "published.csv", keep_default_na=False)
    row = pub[(pub["metric"] == "cifar") & (pub["method"] == "vpt-deep")].iloc[0]
    assert (row.published_data, row.ours_data) == ("tfds", "noah, vtab norm")
    row = pub[(pub["metric"] == "sun397") & (pub["method"] == "vpt-deep")].iloc[0]  # none of ours to compare
    assert (row.published_data, row.ours_data) == ("tfds", "")
    assert set(pub.loc[pub["source"].str.startswith("PRO-VPT main"), "published_data"]) == {"tfds+noah", ""}
    assert "tfds+noah: 10 tasks through TFDS and 9 from the NOAH" in (tmp_path / "tables" / "published.md").read_text()
