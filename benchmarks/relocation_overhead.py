"""PRO-VPT's cost per epoch against VPT-Deep: online scoring (ours) and the authors' scoring pass.

Runs ``provpt.train.run`` on a random 32-px task (train800 / val200, written with ``prepare_split``)
with the embedded profile (params/mini.yaml: the tiny ViT, AdamW, cosine; random backbone
weights, which do not change the cost) for ``--epochs`` epochs per run, three variants per
repetition, interleaved: vpt-deep, pro-vpt scoring=online, pro-vpt scoring=pass. An epoch's time is
the loop's own ``time_s`` record, relocation + training (evaluation and checkpoint writing are the
same for every method and left out); epoch 0 (no relocation yet, first-touch costs) is dropped and
the rest averaged per run (PPO updates every second rewarded move, so averaging keeps them in).

    python benchmarks/relocation_overhead.py
    python benchmarks/relocation_overhead.py --repeats 2 --epochs 3 --train 400
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from common import ROOT, median, paired_ratio, parser, random_task, report, setup_device, interleaved

VARIANTS = {"vpt-deep": ("vpt-deep", "online"), "pro-vpt online": ("pro-vpt", "online"),
            "pro-vpt pass": ("pro-vpt", "pass")}


def main(argv=None):
    p = parser(__doc__)
    p.set_defaults(repeats=3)
    p.add_argument("--epochs", type=int, default=4, help="epochs per run; epoch 0 is not timed (default 4)")
    p.add_argument("--train", type=int, default=800, help="training images (default 800)")
    p.add_argument("--val", type=int, default=200, help="validation images (default 200)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the runs (default 1, as a workflow job)")
    p.add_argument("--profile", type=Path, default=ROOT / "params" / "mini.yaml")
    args = p.parse_args(argv)
    setup_device(args.device)

    from provpt.config import resolve
    from provpt.train import run

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = random_task(tmp, {"train800": args.train, "val200": args.val}, size=32)
        records = {name: [] for name in VARIANTS}
        count = [0]

        def variant(name):
            method, scoring = VARIANTS[name]

            def go():
                count[0] += 1
                cfg = resolve(args.profile, method, overrides={
                    "dataset": "bench", "data_root": str(root), "weights": None,
                    "relocation.scoring": scoring, "epochs": args.epochs, "eval_every": 10**6,
                    "eval_splits": ["val200"], "threads": args.threads, "device": args.device,
                    "progress": False, "seed": 0, "out": str(tmp / "runs" / f"{count[0]:03d}")})
                run(cfg)
                history = [json.loads(line) for line in (Path(cfg.out) / "history.jsonl").read_text().splitlines()]
                timed = [h["time_s"] for h in history[1:]]
                records[name].append({k: sum(t[k] for t in timed) / len(timed) for k in ("relocation", "train")})
                moves = sum(h["moves"] for h in history)
                records[name][-1]["moves"] = moves
                return records[name][-1]["relocation"] + records[name][-1]["train"]
            return go

        t = interleaved({name: variant(name) for name in VARIANTS}, args.repeats, warmup=0)

    rows = []
    for name, ts in t.items():
        rec = records[name]
        rows.append({"variant": name, "epoch_s": median(ts), "relocation_s": median([r["relocation"] for r in rec]),
                     "train_s": median([r["train"] for r in rec]), "moves/run": rec[0]["moves"],
                     "ratio vs vpt-deep": paired_ratio(ts, t["vpt-deep"])})
    title = (f"Epoch time, embedded ViT, {args.train} training images at 32 px, {args.threads} thread(s), "
             f"epochs 1..{args.epochs - 1} of each run, median of {args.repeats} interleaved runs")
    report(args, "relocation_overhead", rows, {"per_run": records}, title=title)


if __name__ == "__main__":
    main()
