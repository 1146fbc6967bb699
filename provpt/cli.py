"""``provpt <command>``: thin wrappers that parse, validate and call one library function each.

Every command takes ``--profile params/<name>.yaml`` and ``key=value`` overrides (YAML values;
dotted keys reach nested sections, e.g. ``relocation.allocator=thompson``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .config import ConfigError, RunConfig, apply_overrides, load_profile


def _profile(args) -> dict:
    return load_profile(args.profile) if args.profile else {}


def _run_config(args, extra: dict | None = None) -> RunConfig:
    profile = _profile(args)
    overrides = list(args.overrides)
    base = profile.get("train", {})
    method = next((o.split("=", 1)[1] for o in overrides if o.startswith("method=")), base.get("method"))
    per_method = (profile.get("train_by_method") or {}).get(method, {})
    cfg = apply_overrides(apply_overrides(base, per_method), {**(extra or {})})
    return RunConfig.from_dict(apply_overrides(cfg, overrides), args.profile or "overrides")


# ----------------------------------------------------------------------------- commands


def cmd_train(args) -> None:
    from .train import run

    extra = {}
    if args.hparams:
        sel = json.loads(Path(args.hparams).read_text())
        extra = {"lr": sel["lr"], "weight_decay": sel["weight_decay"]}
    cfg = _run_config(args, extra)
    metrics = run(cfg)
    evals = ", ".join(f"{s} {v['acc']:.2f}%" for s, v in metrics["eval"].items())
    print(f"{cfg.dataset}/{cfg.method} seed {cfg.seed}: {evals} ({metrics['wall_time_s']:.1f} s) -> {cfg.out}")


def cmd_select(args) -> None:
    from .selection import select

    profile = _profile(args)
    split = (profile.get("search") or {}).get("eval_split", "val200")
    result = select(args.runs, split, Path(args.out))
    print(f"{args.out}: lr={result['lr']} weight_decay={result['weight_decay']} ({split} {result['acc']:.2f}%)")


def cmd_prepare(args) -> None:
    from .prepare import prepare

    profile = apply_overrides(_profile(args), args.overrides)
    for line in prepare(profile, args.dataset):
        print(line)


def cmd_pretrain(args) -> None:
    from .pretrain import pretrain

    profile = apply_overrides(_profile(args), args.overrides)
    train, opts = profile.get("train", {}), dict(profile.get("pretrain") or {})
    fmnist = (profile.get("mini") or {}).get("fmnist_dir")
    if fmnist:
        opts.setdefault("fmnist_dir", fmnist)
    out = args.out or train.get("weights")
    if not out:
        raise ConfigError("pretrain: no --out and no train.weights in the profile")
    result = pretrain(train.get("backbone"), train.get("backbone_kwargs", {}), out, **opts)
    print(json.dumps(result, indent=2))


def cmd_study(args) -> None:
    import importlib

    try:
        module = importlib.import_module(f"provpt.studies.{args.name}")
    except ModuleNotFoundError:
        raise ConfigError(f"unknown study {args.name!r}: expected correlation, timing, adjustment or allocators") from None
    profile = _profile(args)
    summary = module.main(profile, args.overrides)
    print(json.dumps(summary, indent=2, default=str)[:2000])


def cmd_report(args) -> None:
    from .report import make_report

    profile = _profile(args)
    written = make_report(profile, Path(args.results))
    for kind, paths in written.items():
        print(f"{kind}: {paths}")


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="provpt", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def add(name, fn, help_):
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.add_argument("--profile", "-p", help="profile YAML (params/<name>.yaml)")
        sp.set_defaults(fn=fn)
        return sp

    sp = add("prepare", cmd_prepare, "generate (embedded profiles) and cache a profile's datasets as tensors")
    sp.add_argument("--dataset", help="only this dataset (default: all of the profile's)")
    sp.add_argument("overrides", nargs="*", help="key=value overrides of the profile")
    sp = add("pretrain", cmd_pretrain, "pretrain the embedded tiny ViT on Fashion-MNIST")
    sp.add_argument("--out", help="backbone file to write (default: the profile's train.weights)")
    sp.add_argument("overrides", nargs="*", help="key=value overrides of the profile")
    sp = add("train", cmd_train, "one training run into one run folder (resumes an unfinished one)")
    sp.add_argument("--hparams", help="selection JSON whose lr and weight_decay to use")
    sp.add_argument("overrides", nargs="*", help="key=value overrides of the run config (dataset=, method=, ...)")
    sp = add("select", cmd_select, "pick lr/wd from search runs by last-epoch eval accuracy")
    sp.add_argument("--runs", nargs="+", required=True, help="search run folders")
    sp.add_argument("--out", required=True, help="selection JSON to write")
    sp.add_argument("--dataset", help="(recorded only)")
    sp.add_argument("--method", help="(recorded only)")
    sp = add("study", cmd_study, "run one of the studies (correlation, timing, adjustment, allocators)")
    sp.add_argument("name")
    sp.add_argument("overrides", nargs="*", help="key=value overrides")
    sp = add("report", cmd_report, "tables (CSV/Markdown/LaTeX) and figures from finished runs")
    sp.add_argument("--results", required=True, help="results/<profile> folder")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    # key=value overrides may come before or after options: argparse leaves the later ones over
    args, extra = parser.parse_known_args(argv)
    stray = [e for e in extra if e.startswith("-") or "=" not in e]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    args.overrides = list(getattr(args, "overrides", [])) + extra
    try:
        args.fn(args)
    except (ConfigError, FileNotFoundError, KeyError, ValueError) as e:
        if os.environ.get("PROVPT_DEBUG"):
            raise
        print(f"provpt {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
