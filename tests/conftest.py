"""Shared fixtures: tiny dataset folders generated into tmp_path."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest


def _image(seed: int, mode: str = "RGB", size=(16, 16)):
    from PIL import Image

    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    if mode == "RGBA":
        return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 4), dtype=np.uint8))
    return rgb.quantize(8) if mode == "P" else rgb.convert(mode)


def write_image(path: Path, seed: int, mode: str = "RGB", size=(16, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    _image(seed, mode, size).save(path)
    return path


# split -> [(file name, mode, label)]; grayscale JPEG, RGBA/palette PNG, CMYK JPEG included
NOAH_SPLITS = {
    "train800": [("000000.jpg", "RGB", 0), ("000001.jpg", "L", 1), ("000002.png", "RGBA", 2), ("000003.jpg", "RGB", 0)],
    "val200": [("000000.jpg", "RGB", 1), ("000001.png", "P", 0)],
    "train800val200": [("000000.jpg", "RGB", 0), ("000001.jpg", "CMYK", 1), ("000002.jpg", "RGB", 2)],
    "test": [("000000.jpg", "RGB", 2), ("000001.jpg", "L", 2), ("000002.jpg", "RGB", 1)],
}


@pytest.fixture
def noah_root(tmp_path) -> Path:
    """``<root>/toy/{train800,val200,train800val200,test}.txt`` with 3 classes."""
    root = tmp_path / "vtab"
    task = root / "toy"
    for k, (split, rows) in enumerate(NOAH_SPLITS.items()):
        lines = []
        for j, (name, mode, label) in enumerate(rows):
            write_image(task / "images" / split / name, seed=10 * k + j, mode=mode)
            lines.append(f"images/{split}/{name} {label}")
        (task / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root


# class ids deliberately sparse; test holds a class (42) that train lacks
FGVC_SPLITS = {
    "train": {"a/1.jpg": 17, "a/2.jpg": 5, "b/3.png": 17},
    "val": {"b/4.jpg": 5},
    "test": {"c/5.jpg": 42, "c/6.jpg": 17},
}


@pytest.fixture
def fgvc_root(tmp_path) -> Path:
    """``<root>/{train,val,test}.json`` with keys relative to ``<root>/images`` (VPT's CUB)."""
    root = tmp_path / "fgvc"
    for k, (split, entries) in enumerate(FGVC_SPLITS.items()):
        for j, rel in enumerate(entries):
            mode = "RGBA" if rel.endswith(".png") else "RGB"
            write_image(root / "images" / rel, seed=100 + 10 * k + j, mode=mode, size=(24, 16))
        (root / f"{split}.json").write_text(json.dumps(entries, indent=1))
    return root


@pytest.fixture
def noah_splits() -> dict:
    return NOAH_SPLITS


@pytest.fixture
def fgvc_splits() -> dict:
    return FGVC_SPLITS


@pytest.fixture
def image_writer():
    return write_image


# ----------------------------------------------------------------------------- training fixtures

TOY_SIZES = {"train800": 48, "val200": 24, "train800val200": 72, "test": 24}


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory) -> Path:
    """A prepared 3-class 16 px task ``toy`` (class = dominant colour channel + noise)."""
    from PIL import Image

    from provpt.data.cache import prepare_vtab_task

    src, cache = tmp_path_factory.mktemp("raw"), tmp_path_factory.mktemp("cache")
    rng = np.random.default_rng(0)
    for split, n in TOY_SIZES.items():
        lines = []
        for i in range(n):
            img = rng.integers(0, 120, (16, 16, 3), dtype=np.uint8)
            img[..., i % 3] += 100
            path = src / "toy" / "images" / split / f"{i:06d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(path)
            lines.append(f"images/{split}/{i:06d}.png {i % 3}")
        (src / "toy" / f"{split}.txt").write_text("\n".join(lines) + "\n")
    prepare_vtab_task(src, "toy", cache, size=16, num_classes=3, group="natural", progress=False)
    return cache


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: more threads only oversubscribe a shared CPU."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- the suite on both cores

# `make test` runs pytest-xdist (-n 2). A module-scoped fixture is built once per worker that runs one
# of its tests, so the tests that share an expensive one (a whole Snakemake run) must go to one worker,
# in one piece: the smoke profile's run (its DVC and SLURM tests build on it; two SLURM test clusters
# cannot run at once either) and each paper-profile rehearsal. xdist's own `--dist loadgroup` cannot
# do it under pytest 9 (it renames `item._nodeid`, which pytest 9 no longer reads), so the scheduler
# below makes each such group one scope of xdist's scope scheduler and every other test a scope of
# its own; scopes with more tests start first (xdist's reordering), so the long groups begin at once.
SHARED_RUNS = {"smoke": "smoke", "dvc_smoke": "smoke", "slurm": "smoke", "rehearsal": "rehearsal"}
SMOKE_TESTS = re.compile(r"test_(smoke_|dvc_repro$|dvc_push_|slurm_job_output_)")


def shared_run_scope(nodeid: str) -> str:
    """The xdist scope of a test, from its node id alone (the scheduler sees nothing else)."""
    path, _, name = nodeid.partition("::")
    if path.endswith("test_paper_profiles.py") and name.endswith("]"):
        return "rehearsal-" + name[name.index("[") + 1:-1]
    if path.endswith("test_workflow.py") and SMOKE_TESTS.match(name):
        return "smoke"
    return nodeid


def pytest_collection_modifyitems(config, items):
    """Every test that uses a shared run must be in its scope (else it would build the run again on
    another worker): checked against the fixtures it really uses, so a new test cannot slip out."""
    for item in items:
        groups = {SHARED_RUNS[f] for f in getattr(item, "fixturenames", ()) if f in SHARED_RUNS}
        if "rehearsal" in groups:
            groups = {f"rehearsal-{item.callspec.params['rehearsal']}"}
        scope = shared_run_scope(item.nodeid)
        if groups and groups != {scope}:
            raise pytest.UsageError(f"{item.nodeid} uses the shared run {sorted(groups)} but tests/conftest.py "
                                    f"schedules it as {scope!r}: extend shared_run_scope")


@pytest.hookimpl(optionalhook=True)  # (pytest-xdist's hook: unknown where xdist is absent or disabled)
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") not in ("load", "loadgroup"):
        return None  # (another --dist mode asked for: xdist's own scheduler)
    from xdist.scheduler import LoadScopeScheduling

    class SharedRunScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return shared_run_scope(nodeid)

    return SharedRunScheduling(config, log)


def pytest_configure(config):
    # Two workers on two cores: torch's own threads in each would only oversubscribe them (the
    # Snakemake jobs the tests start set their threads themselves).
    if os.environ.get("PYTEST_XDIST_WORKER") and int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
