"""`dinoscale curate CONFIG [overrides] [--stage NAME] [--slice i/n | --merge N]`, alone or on every rank
of `torchrun ... -m dinoscale.cli curate ...` (gloo on CPU, NCCL on GPU).

Kept apart from the stage runner so that building the `dinoscale` parser imports nothing heavy.
"""

from __future__ import annotations

import argparse

from dinoscale.errors import ConfigError


def add_curate_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the `curate` command on the `dinoscale` sub-command parsers."""
    parser = subparsers.add_parser("curate", help="curate a pool of images into balanced webdataset shards")
    parser.add_argument("config", help="preset name (e.g. curate/small) or a YAML file")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    parser.add_argument("--stage", help="run only this stage: embed, dedup, kmeans, assign, sample, shards or report")
    parser.add_argument("--slice", help="with a parallel --stage (embed, assign, shards): run slice i of n, as i/n")
    parser.add_argument("--merge", type=int, metavar="N", help="with a parallel --stage: join its slices 0..N-1")
    parser.set_defaults(handler=cmd_curate)
    return parser


def cmd_curate(args: argparse.Namespace) -> None:
    from dinoscale.config import load_config
    from dinoscale.curation.pipeline import merge_stage, parse_slice, run_curation, stage_dir
    from dinoscale.distributed import launcher_rank

    if (args.slice or args.merge) and not args.stage:
        raise ConfigError("--slice and --merge need --stage NAME (a parallel stage: embed, assign or shards)")
    if args.slice and args.merge:
        raise ConfigError("give either --slice i/n (run one slice) or --merge N (join N slices), not both")
    cfg = load_config(args.config, args.overrides)
    if args.merge:
        result = {args.stage: merge_stage(cfg, args.stage, args.merge)}
    else:
        result = run_curation(cfg, args.stage, parse_slice(args.slice) if args.slice else None)
    if launcher_rank() == 0:  # every rank of a torchrun or SLURM job has the same result
        for name, counts in result.items():
            print(f"{name}: {counts}")
        if "dedup" in result and cfg.curation.pool:
            print(f"what dedup removed, as pictures: {stage_dir(cfg, 'dedup') / 'report.html'}")
