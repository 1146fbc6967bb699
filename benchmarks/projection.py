"""Projected GPU-hours and disk of the full vtab1k and fgvc reproductions, through `provpt plan`'s model.

The model lives in the library (provpt/plan.py, torch-free; the workflow prices each job's `runtime`
with it): work counted from the resolved run configurations, FLOPs of ViT-B/16 per image (checked
against torch.utils.flop_counter in tests/test_plan.py), an effective rate per precision (an
assumption: *projected*) or the images/s of measured GPU epochs (--measured: the records
benchmarks/gpu_epoch.py writes). This script prints, per profile, the plan at the profile's own
precision and scoring next to the earlier projection's assumptions (every run bf16, `pro-vpt` priced
like VPT-Deep, without its scoring pass) and the other precisions.

    python benchmarks/projection.py
    python benchmarks/projection.py --profiles vtab1k --measured gpu_epoch.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from provpt.plan import EFFECTIVE_FLOPS, plan, read_measured, render  # noqa: E402

VARIANTS = {
    "profile": [],  # its own precision (fp32) and scoring (pro-vpt: pass)
    "earlier projection (bf16, pro-vpt without its pass)": ["train.precision=bf16",
                                                           "train_by_method.pro-vpt.relocation.scoring=online"],
    "tf32": ["train.precision=tf32"],
    "bf16": ["train.precision=bf16"],
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="\n".join(__doc__.splitlines()[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profiles", nargs="+", default=["vtab1k", "fgvc"])
    p.add_argument("--measured", type=Path, help="measured GPU epochs (benchmarks/gpu_epoch.py's JSON)")
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args(argv)
    measured = read_measured(args.measured) if args.measured else None
    rows = []
    for name in args.profiles:
        path = ROOT / "params" / f"{name}.yaml"
        print(render(plan(path, (), measured)) + "\n")
        for label, over in VARIANTS.items():
            try:
                q = plan(path, over, measured)
            except ValueError as e:  # a precision this checkout's RunConfig does not know yet
                print(f"  ({label}: {e})")
                continue
            rules = q["rules"]
            pro = q["per_method"].get("pro-vpt")
            rate = EFFECTIVE_FLOPS[q["precision"]] / 1e12
            rows.append({"profile": name, "variant": label, "precision": q["precision"],
                         "search_h": rules["search_pack"]["gpu_s"] / 3600,
                         "final_h": rules["final_seeds"]["gpu_s"] / 3600,
                         "pro-vpt_h": pro["gpu_s"] / 3600 if pro else None,
                         "longest_job_h": max(r["longest_s"] for r in rules.values()) / 3600,
                         "how": "measured" if measured else f"projected ({rate:.0f} TFLOP/s)"})
    print(f"{'profile':<8}{'variant':<52}{'search h':>10}{'final h':>9}{'pro-vpt h':>11}{'longest job h':>15}  how")
    for r in rows:
        print(f"{r['profile']:<8}{r['variant']:<52}{r['search_h']:>10.1f}{r['final_h']:>9.1f}"
              f"{(r['pro-vpt_h'] or 0):>11.1f}{r['longest_job_h']:>15.2f}  {r['how']}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
