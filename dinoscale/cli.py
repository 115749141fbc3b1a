"""The `dinoscale` command: one entry point for every stage.

User mistakes (`DinoscaleError`) print one line and exit 2; real bugs raise with a traceback.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Sequence

from omegaconf import OmegaConf

from dinoscale.errors import DinoscaleError

Handler = Callable[[argparse.Namespace], int | None]


def _add_config_args(parser: argparse.ArgumentParser, preset_required: bool = True) -> None:
    parser.add_argument("config", nargs=None if preset_required else "?",
                        help="preset name (see `dinoscale config list`) or a YAML file")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")


def cmd_config(args: argparse.Namespace) -> None:
    from dinoscale.config import keys_text, list_presets, load_config

    if args.action == "keys":
        if args.overrides:
            raise DinoscaleError("`dinoscale config keys` takes one key prefix, e.g. `dinoscale config keys optim`")
        print(keys_text(args.config or ""))
        return
    if args.action == "list":
        if args.config:
            raise DinoscaleError(f"`dinoscale config list` lists the presets and takes no argument; for the keys "
                                 f"under '{args.config}' run `dinoscale config keys {args.config}`")
        print("\n".join(list_presets()))
        return
    if not args.config:
        raise DinoscaleError("`dinoscale config show` needs a preset name or a YAML file")
    print(OmegaConf.to_yaml(load_config(args.config, args.overrides)), end="")


def cmd_pool(args: argparse.Namespace) -> None:
    from dinoscale.data.pool import open_pool

    pool = open_pool(args.path)
    summary = pool.scan() if args.scan else pool.summary()
    labels = f", {len(pool.class_names)} classes" if pool.class_names else ""
    print(f"{type(pool).__name__} at {args.path}{labels}: {summary}")


def cmd_models(args: argparse.Namespace) -> None:
    from dinoscale.models import describe_presets, format_presets_table

    print(format_presets_table(describe_presets()))


def cmd_train(args: argparse.Namespace) -> None:
    from dinoscale.config import load_config
    from dinoscale.train.trainer import train

    exported = train(load_config(args.config, args.overrides))
    if exported is not None:
        print(f"teacher backbone exported to {exported}")


def cmd_distill(args: argparse.Namespace) -> None:
    from dinoscale.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        from dinoscale.distill.dryrun import dry_run

        print(dry_run(cfg, args.world_size))
        return
    from dinoscale.distill.job import distill

    exports = distill(cfg)
    for name, path in (exports or {}).items():
        print(f"student {name} exported to {path}")


def cmd_export(args: argparse.Namespace) -> None:
    from dinoscale.train.export import export_run

    print(f"wrote {export_run(args.run_dir, args.out)}")


def cmd_demo(args: argparse.Namespace) -> None:
    from dinoscale.demo.run import run_demo

    run_demo(args.out, quick=args.quick, overrides=args.overrides)


def cmd_bench(args: argparse.Namespace) -> int:
    """`python -m benchmarks ARGS` in the source checkout this package runs from: the benchmarks (and
    the peers they compare with) are not part of the installed package."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "benchmarks" / "suite.py").exists():
        raise DinoscaleError("`dinoscale bench` runs the benchmarks of a source checkout; install dinoscale from "
                             "one with `pip install -e '.[dev]'` (this installation has no benchmarks/ folder)")
    path = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
    return subprocess.call([sys.executable, "-m", "benchmarks", *args.suite_args], env={**os.environ, "PYTHONPATH": path})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dinoscale", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("config", help="list presets (list), every key with its default and meaning (keys "
                                      "[PREFIX]), or print a resolved config (show PRESET [overrides])")
    p.add_argument("action", choices=["show", "list", "keys"])
    _add_config_args(p, preset_required=False)
    p.set_defaults(handler=cmd_config)

    p = sub.add_parser("pool", help="open an image pool and print its summary")
    p.add_argument("path", help="image folder, .txt list of paths, or folder of tar shards")
    p.add_argument("--scan", action="store_true", help="decode every image and count skips")
    p.set_defaults(handler=cmd_pool)

    p = sub.add_parser("models", help="list backbone presets with parameter counts and GFLOPs per image")
    p.set_defaults(handler=cmd_models)

    p = sub.add_parser("train", help="SSL training, alone or under torchrun (resumes from the run's last checkpoint)")
    _add_config_args(p)
    p.set_defaults(handler=cmd_train)

    p = sub.add_parser("distill", help="multi-student distillation of a frozen teacher, alone or under torchrun "
                                       "(resumes from the students' last common checkpoint)")
    _add_config_args(p)
    p.add_argument("--dry-run", action="store_true", help="check the job and print each student's rank group and "
                                                          "memory per rank; start nothing")
    p.add_argument("--world-size", type=int, default=None, help="ranks of the dry run (default: those the "
                                                                 "students' groups span)")
    p.set_defaults(handler=cmd_distill)

    p = sub.add_parser("export", help="write a run's teacher backbone as a plain official-layout state dict")
    p.add_argument("run_dir", help="training run directory")
    p.add_argument("out", help="output .pth file (loadable with dinoscale.models.load_backbone)")
    p.set_defaults(handler=cmd_export)

    from dinoscale.curation.cli import add_curate_parser
    from dinoscale.eval.cli import add_eval_commands
    from dinoscale.slurm.cli import add_submit_parser

    add_curate_parser(sub)
    add_submit_parser(sub)

    add_eval_commands(sub.add_parser("eval", help="k-NN, linear probe, pictures and reports"))

    p = sub.add_parser("demo", help="the whole pipeline on the embedded synthetic pool")
    p.add_argument("--out", default="demo_out", help="output folder (re-running skips finished stages)")
    p.add_argument("--quick", action="store_true", help="a one-minute profile (used by the tests)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides of the demo config")
    p.set_defaults(handler=cmd_demo)

    # every argument, options too, goes to the suite (no option prefix of its own: "+" is never used)
    p = sub.add_parser("bench", prefix_chars="+", add_help=False,
                       help="run the benchmark suite of a source checkout (`dinoscale bench --help`: its options)")
    p.add_argument("suite_args", nargs="*", help="options of `python -m benchmarks`")
    p.set_defaults(handler=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args) or 0
    except DinoscaleError as err:
        print(f"dinoscale: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
