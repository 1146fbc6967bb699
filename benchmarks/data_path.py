"""Data path: images/s from the prepared uint8 cache against decoding JPEGs every epoch.

Generates ``--images`` photo-like JPEGs at ``--size`` px in a temporary folder, then times one
epoch (batches of 64 in a random order, normalised float tensors ready for the model) three ways:

- ``jpeg``: PIL decode + RGB + resize (``provpt.data.cache.decode_image``) of every image, stacked
  and normalised, in the main process (what a per-epoch decoding loader does per worker);
- ``jpeg-threads``: the same decoding in a thread pool of ``--workers`` (PIL releases the GIL);
- ``cache``: ``provpt.data.task.TaskData`` over the split prepared once by ``prepare_split`` (uint8
  held in memory, or on the GPU with --device cuda; indexing + normalisation per batch);
- ``cache-inplace``: the same arrays, the epoch's order moved to the device once and the batch
  normalised in place (``x.float().sub_(mean).div_(std)``, bitwise the same values): a proposed
  change of ``TaskData.batch(es)``.

``--source-size`` writes the JPEGs larger (e.g. 500 px, like typical source photos) so that the
JPEG path also pays the resize to ``--size``.

The one-off ``prepare_split`` cost and the TaskData load time are printed too.

    python benchmarks/data_path.py
    python benchmarks/data_path.py --images 128 --repeats 3
"""

from __future__ import annotations

import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from common import interleaved, median, parser, report, setup_device, sync, write_images


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--images", type=int, default=384, help="JPEGs generated (default 384)")
    p.add_argument("--size", type=int, default=224, help="image side given to the model, px (default 224)")
    p.add_argument("--source-size", type=int, help="side of the generated JPEGs (default: --size)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="decoding threads (default: all cores)")
    args = p.parse_args(argv)
    device = setup_device(args.device)

    from provpt.config import RunConfig
    from provpt.data.cache import NORMALISATION, decode_image, prepare_split
    from provpt.data.task import TaskData

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = write_images(tmp / "jpeg", args.images, args.source_size or args.size, "jpg")
        labels = np.arange(args.images) % 10
        t0 = time.perf_counter()
        prepare_split(list(zip(paths, labels)), tmp / "cache" / "bench", "train", args.size,
                      info={"task": "bench", "num_classes": 10}, progress=False)
        prepare_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        cfg = RunConfig.from_dict(dict(dataset="bench", data_root=str(tmp / "cache"), train_split="train",
                                       eval_splits=["train"], device=str(device)))
        data = TaskData(cfg, device)
        sync(device)
        load_s = time.perf_counter() - t0

        mean, std = (torch.tensor(v).view(1, 3, 1, 1) * 255 for v in NORMALISATION["vtab"])
        pool = ThreadPoolExecutor(args.workers)
        gen = torch.Generator().manual_seed(0)

        def jpeg_epoch(mapper):
            def run():
                order = torch.randperm(args.images, generator=gen).tolist()
                for s in range(0, args.images, args.batch):
                    imgs = mapper(lambda i: decode_image(paths[i], args.size), order[s:s + args.batch])
                    x = torch.from_numpy(np.stack(list(imgs))).to(device).float()
                    x = (x - mean.to(device)) / std.to(device)
                sync(device)
            return run

        def cache_epoch():
            order = torch.randperm(args.images, generator=gen)
            for x, y in data.batches("train", args.batch, order, train=True, gen=gen):
                pass
            sync(device)

        def cache_inplace_epoch():
            images, labels = data.splits["train"]
            order = torch.randperm(args.images, generator=gen).to(device)
            for s in range(0, args.images, args.batch):
                idx = order[s:s + args.batch]
                x, y = images[idx].float().sub_(data.mean).div_(data.std), labels[idx]
            sync(device)

        variants = {"jpeg": jpeg_epoch(map), f"jpeg-threads({args.workers})": jpeg_epoch(pool.map),
                    "cache": cache_epoch, "cache-inplace": cache_inplace_epoch}
        t = interleaved(variants, args.repeats, warmup=1)
        pool.shutdown()

    base = median(t["jpeg"])
    rows = [{"path": name, "images/s": args.images / median(ts), "ms/batch": 1000 * median(ts) * args.batch / args.images,
             "vs jpeg": base / median(ts)} for name, ts in t.items()]
    rows.append({"path": "prepare_split (once)", "images/s": args.images / prepare_s,
                 "ms/batch": 1000 * prepare_s * args.batch / args.images, "vs jpeg": None})
    title = (f"Data path, {args.images} JPEGs at {args.source_size or args.size} px -> {args.size}, "
             f"batch {args.batch}, device {device}, "
             f"median of {args.repeats} epochs (TaskData load {load_s:.2f} s)")
    report(args, "data_path", rows, {"prepare_s": prepare_s, "taskdata_load_s": load_s}, title=title)


if __name__ == "__main__":
    main()
