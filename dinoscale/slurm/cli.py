"""`dinoscale submit train|distill|curate|eval`: the same commands as SLURM jobs (or local submitit processes).

By default the command waits for the job(s) and reports a failure with its error and log path
(exit 2); `--no-wait` returns after printing the job id and how to follow it.
"""

from __future__ import annotations

import argparse
from typing import Any

from dinoscale.slurm.commands import (JobResources, distill_task, dry_run_curation, dry_run_eval, dry_run_train,
                                    follow_hint, submit_curation, submit_eval, submit_train, train_task)
from dinoscale.slurm.wait import wait_for


def _resources(args: argparse.Namespace) -> JobResources:
    return JobResources(nodes=args.nodes, gpus_per_node=args.gpus_per_node, tasks_per_node=args.tasks_per_node,
                        cpus_per_task=args.cpus_per_task, partition=args.partition, time_min=args.time,
                        account=args.account, qos=args.qos, constraint=args.constraint, mem_gb=args.mem, local=args.local)


def _wait(args: argparse.Namespace, jobs: Any) -> Any:
    if args.no_wait:
        return None
    return wait_for(jobs)


def _submit_run(args: argparse.Namespace, task: Any, name: str) -> Any:
    """Submit (or with --dry-run print) a job running `task` on the config; the first task's result
    once it has finished, None when not waiting or on a dry run."""
    from dinoscale.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        print(dry_run_train(cfg, _resources(args), task, name), end="")
        return None
    job = submit_train(cfg, _resources(args), task, name)
    print(follow_hint(job), flush=True)
    results = _wait(args, job)
    return results[0] if isinstance(results, list) else results


def cmd_submit_train(args: argparse.Namespace) -> None:
    exported = _submit_run(args, train_task, "dinoscale-train")
    if exported is not None:
        print(f"teacher backbone exported to {exported}")


def cmd_submit_distill(args: argparse.Namespace) -> None:
    for name, path in (_submit_run(args, distill_task, "dinoscale-distill") or {}).items():
        print(f"student {name} exported to {path}")


def cmd_submit_curate(args: argparse.Namespace) -> None:
    from dinoscale.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        print(dry_run_curation(cfg, _resources(args), args.stage), end="")
        return
    jobs = submit_curation(cfg, _resources(args), args.slices, args.stage)
    if not jobs.all():
        print(f"nothing to submit: the curation stages in {cfg.curation.output_dir} are already done")
        return
    for name, job in jobs.single.items():
        array = jobs.slices.get(name)
        prefix = f"{name}: {len(array)} slices as job {array[0].job_id.split('_')[0]}, merge " if array else f"{name}: "
        print(prefix + follow_hint(job), flush=True)
    _wait(args, jobs.all())
    if not args.no_wait:
        print(f"curation finished in {cfg.curation.output_dir}")


def cmd_submit_eval(args: argparse.Namespace) -> None:
    argv = [args.eval_command, *args.eval_args]
    if args.dry_run:
        print(dry_run_eval(argv, args.job_dir, _resources(args)), end="")
        return
    job = submit_eval(argv, args.job_dir, _resources(args))
    print(follow_hint(job), flush=True)
    _wait(args, job)


def _add_job_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("job")
    group.add_argument("--nodes", type=int, default=1)
    group.add_argument("--gpus-per-node", type=int, default=0, help="one task per GPU (0: CPU nodes)")
    group.add_argument("--tasks-per-node", type=int, default=1, help="tasks per node when --gpus-per-node is 0")
    group.add_argument("--cpus-per-task", type=int, default=1)
    group.add_argument("--partition", default=None, help="SLURM partition (default: the cluster's default)")
    group.add_argument("--time", type=int, default=60, help="time limit in minutes")
    group.add_argument("--account", default=None)
    group.add_argument("--qos", default=None)
    group.add_argument("--constraint", default=None)
    group.add_argument("--mem", type=float, default=None, help="memory per node in GB (default: the partition's)")
    group.add_argument("--dry-run", action="store_true", help="print the sbatch script and submit nothing")
    group.add_argument("--local", action="store_true", help="run the job with submitit's local executor here")
    group.add_argument("--no-wait", action="store_true", help="return once submitted instead of waiting")


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="preset name or YAML file")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")


def add_submit_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `submit train|distill|curate|eval` to the `dinoscale` command's sub-parsers."""
    parser = subparsers.add_parser("submit", help="run train / distill / curate / eval as SLURM jobs")
    sub = parser.add_subparsers(dest="submit_command", required=True)

    p = sub.add_parser("train", help="checkpointable distributed training job (requeued and resumed on preemption)")
    _add_config_arguments(p)
    _add_job_options(p)
    p.set_defaults(handler=cmd_submit_train)

    p = sub.add_parser("distill", help="checkpointable multi-student distillation job (one task per rank of the "
                                       "students' groups; requeued and resumed on preemption)")
    _add_config_arguments(p)
    _add_job_options(p)
    p.set_defaults(handler=cmd_submit_distill)

    p = sub.add_parser("curate", help="curation stages: collective ones (dedup, kmeans, sample) as one job of "
                                      "--nodes x --tasks-per-node ranks, parallel ones as job arrays merged after")
    _add_config_arguments(p)
    p.add_argument("--slices", type=int, default=1, help="array tasks per parallel stage (embed, assign, shards)")
    p.add_argument("--stage", default=None, help="submit only this stage (its upstream stages must be done)")
    _add_job_options(p)
    p.set_defaults(handler=cmd_submit_curate)

    p = sub.add_parser("eval", help="an eval command (knn, linear, visualize, report) as one job")
    p.add_argument("eval_command", choices=["knn", "linear", "visualize", "report"])
    p.add_argument("eval_args", nargs=argparse.REMAINDER, help="the eval command's own options and overrides")
    p.add_argument("--job-dir", default="runs/slurm-eval", help="folder for the job's logs")
    _add_job_options(p)
    p.set_defaults(handler=cmd_submit_eval)
    return parser
