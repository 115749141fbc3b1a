"""Submitting dinoscale's commands as SLURM jobs: a distributed training run, the curation pipeline as
job arrays with afterok dependencies, and evaluation commands.

Each submission saves its resolved config into its job folder (`RUN/slurm/config.yaml` for training,
`CURATION_OUTPUT/slurm/` for curation) and the job loads it from there, so only a path travels in the
pickle. Curation's collective stages (dedup, k-means, sampling) run as one job of `nodes` x
`tasks_per_node` tasks (one per GPU with `gpus_per_node`) that form a torch.distributed process group;
its parallel stages stay job arrays of one-task jobs. Training runs one task per GPU (or `tasks_per_node` on CPU nodes) that initialises
torch.distributed from the SLURM environment; the job is checkpointable: on preemption or time-out the
trainer saves a checkpoint, submitit requeues the job and `train` resumes from the run's last checkpoint.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import submitit
from omegaconf import DictConfig, OmegaConf

from dinoscale.errors import SlurmError
from dinoscale.slurm.checks import check_partition, check_slurm_reachable
from dinoscale.distributed import distributed_env_from_slurm
from dinoscale.slurm.executor import dry_run_script, make_executor
from dinoscale.slurm.jobs import CheckpointableCall, submit, submit_array
from dinoscale.utils.io import write_text

CONFIG_NAME = "config.yaml"


@dataclass(frozen=True)
class JobResources:
    """What each job asks SLURM for; `gpus_per_node` > 0 sets one task per GPU, else `tasks_per_node`."""

    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int = 1
    cpus_per_task: int = 1
    partition: str | None = None
    time_min: int = 60
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    mem_gb: float | None = None
    local: bool = False

    @property
    def tasks(self) -> int:
        return self.gpus_per_node or self.tasks_per_node


def build_executor(folder: str | Path, resources: JobResources, *, name: str, tasks: int | None = None,
                   nodes: int | None = None, check: bool = True) -> submitit.AutoExecutor:
    """An executor for `resources` writing into `folder`; on SLURM (with `check`) first checks that the
    controller answers and the partition exists, so a mistake is reported before anything is written."""
    if check and not resources.local:
        check_slurm_reachable()
        if resources.partition:
            check_partition(resources.partition)
    return make_executor(
        folder, nodes=nodes or resources.nodes, tasks_per_node=tasks or resources.tasks, gpus_per_node=resources.gpus_per_node,
        cpus_per_task=resources.cpus_per_task, partition=resources.partition, time_min=resources.time_min,
        account=resources.account, qos=resources.qos, constraint=resources.constraint, mem_gb=resources.mem_gb,
        local=resources.local, name=name)


def _save_config(cfg: DictConfig, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CONFIG_NAME
    write_text(path, OmegaConf.to_yaml(cfg))
    return path


# ----------------------------------------------------------------------------- training


def train_task(config_path: str) -> str | None:
    """One task of a training job: torch.distributed from the SLURM/submitit environment, then `train`.

    When a signal stopped the run (a checkpoint is written), the task exits without a result: rank 0 has
    already requeued the job, or SLURM is ending it, and the submitter follows SLURM's state instead.
    """
    from dinoscale.config import load_config
    from dinoscale.train.trainer import train

    os.environ.update(distributed_env_from_slurm().torch_env())
    exported = train(load_config(config_path))
    if exported is None:
        raise SystemExit(0)
    return str(exported)


def train_folder(cfg: DictConfig) -> Path:
    """The job folder of a training run: submitit's pickles and logs, and the resolved config."""
    return Path(cfg.train.output_dir) / "slurm"


def submit_train(cfg: DictConfig, resources: JobResources, task: Callable[[str], Any] = train_task,
                 name: str = "dinoscale-train") -> submitit.Job:
    """Submit `train(cfg)` (or another `task` of the saved config, e.g. `distill_task`) as one
    checkpointable job of `resources.tasks` tasks per node."""
    folder = train_folder(cfg)
    executor = build_executor(folder, resources, name=name)
    return submit(executor, CheckpointableCall(task), str(_save_config(cfg, folder)))


def dry_run_train(cfg: DictConfig, resources: JobResources, task: Callable[[str], Any] = train_task,
                  name: str = "dinoscale-train") -> str:
    """The sbatch script `submit_train` would submit; nothing is written or submitted."""
    executor = build_executor(train_folder(cfg), resources, name=name, check=False)
    return dry_run_script(executor, CheckpointableCall(task), str(train_folder(cfg) / CONFIG_NAME))


# ----------------------------------------------------------------------------- distillation


def distill_task(config_path: str) -> dict[str, str] | None:
    """One task of a distillation job (as `train_task`): every student's export, or no result when a
    signal stopped the job after its checkpoints."""
    from dinoscale.config import load_config
    from dinoscale.distill.job import distill

    os.environ.update(distributed_env_from_slurm().torch_env())
    exports = distill(load_config(config_path))
    if exports is None:
        raise SystemExit(0)
    return {name: str(path) for name, path in exports.items()}


# ----------------------------------------------------------------------------- curation


def curation_stage_task(config_path: str, name: str, slice_index: int | None = None,
                        n_slices: int | None = None) -> dict:
    """Run one curation stage, or slice `slice_index` of `n_slices` of a parallel one (skipped when done)."""
    from dinoscale.config import load_config
    from dinoscale.curation.pipeline import run_stage

    cfg = load_config(config_path)
    return run_stage(cfg, name, None if slice_index is None else (slice_index, n_slices))


def curation_collective_task(config_path: str, names: Sequence[str]) -> dict:
    """One task of a multi-task job running collective curation stages `names` in order, every task a
    rank of one torch.distributed process group set up from the SLURM environment."""
    from dinoscale.config import load_config
    from dinoscale.curation.launch import curation_ranks
    from dinoscale.curation.pipeline import run_stage

    os.environ.update(distributed_env_from_slurm().torch_env())
    cfg = load_config(config_path)
    with curation_ranks(cfg):
        return {name: run_stage(cfg, name) for name in names}


def curation_merge_task(config_path: str, name: str, n_slices: int) -> dict:
    """Merge the `n_slices` slices of a parallel curation stage."""
    from dinoscale.config import load_config
    from dinoscale.curation.pipeline import merge_stage

    return merge_stage(load_config(config_path), name, n_slices)


def curation_folder(cfg: DictConfig) -> Path:
    return Path(cfg.curation.output_dir) / "slurm"


def stages_to_submit(cfg: DictConfig, only: str | None = None) -> list[str]:
    """The stages after the last finished prefix of the pipeline (a stage is redone once one before it is),
    or just `only` unless it is done."""
    from dinoscale.curation.pipeline import list_stages, stage_is_done

    if only is not None:
        return [] if stage_is_done(cfg, only) else [only]
    stages = list_stages(cfg)
    done = 0
    while done < len(stages) and stage_is_done(cfg, stages[done]):
        done += 1
    return stages[done:]


@dataclass(frozen=True)
class CurationJobs:
    """The jobs of one curation submission, by stage: a parallel stage has its slices then its merge."""

    slices: dict[str, list[submitit.Job]]
    single: dict[str, submitit.Job]

    def all(self) -> list[submitit.Job]:
        return [job for jobs in self.slices.values() for job in jobs] + list(self.single.values())


def submit_curation(cfg: DictConfig, resources: JobResources, n_slices: int, only: str | None = None) -> CurationJobs:
    """Submit every unfinished curation stage (or only stage `only`) in order: a parallel stage as an array
    of `n_slices` one-task slices and a merge that runs after all of them succeeded; consecutive collective
    stages as one job of `resources.nodes` x `resources.tasks` tasks (a process group; one task when that is
    1); the report as one task after the stage before. Slices finished by an earlier submission return at once."""
    from dinoscale.curation.pipeline import stage_is_collective, stage_is_parallel

    if n_slices < 1:
        raise SlurmError(f"submit curate: --slices must be at least 1, got {n_slices}")
    folder = curation_folder(cfg)
    config_path = str(_save_config(cfg, folder))
    one_task = build_executor(folder, resources, name="dinoscale-curate", tasks=1, nodes=1)
    ranks = resources.nodes * resources.tasks
    slices: dict[str, list[submitit.Job]] = {}
    single: dict[str, submitit.Job] = {}
    previous: submitit.Job | None = None
    stages = stages_to_submit(cfg, only)
    collective = [name for name in stages if stage_is_collective(name)] if ranks > 1 else []
    for names in _job_groups(stages, collective):
        name = names[0]
        if len(names) > 1 or name in collective:
            executor = build_executor(folder, resources, name="dinoscale-curate", check=False)
            previous = submit(executor, CheckpointableCall(curation_collective_task), config_path, names, after=previous)
        elif stage_is_parallel(name) and n_slices > 1:
            array = submit_array(one_task, CheckpointableCall(curation_stage_task),
                                 [(config_path, name, i, n_slices) for i in range(n_slices)], after=previous)
            slices[name] = array
            previous = submit(one_task, CheckpointableCall(curation_merge_task), config_path, name, n_slices,
                              after=array)
        else:
            previous = submit(one_task, CheckpointableCall(curation_stage_task), config_path, name, after=previous)
        for name in names:
            single[name] = previous
    return CurationJobs(slices, single)


def _job_groups(stages: Sequence[str], collective: Sequence[str]) -> list[list[str]]:
    """The stages in order, consecutive `collective` ones together (one job each group)."""
    groups: list[list[str]] = []
    for name in stages:
        if groups and name in collective and groups[-1][-1] in collective:
            groups[-1].append(name)
        else:
            groups.append([name])
    return groups


def dry_run_curation(cfg: DictConfig, resources: JobResources, only: str | None = None) -> str:
    """The sbatch script of the first curation job."""
    executor = build_executor(curation_folder(cfg), resources, name="dinoscale-curate", tasks=1, nodes=1, check=False)
    stages = stages_to_submit(cfg, only) or [only or "report"]
    return dry_run_script(executor, CheckpointableCall(curation_stage_task),
                          str(curation_folder(cfg) / CONFIG_NAME), stages[0])


# ----------------------------------------------------------------------------- evaluation


def eval_task(argv: Sequence[str]) -> None:
    """Run `dinoscale eval ARGV...` inside the job (a user mistake fails the job with its message)."""
    import argparse

    from dinoscale.eval.cli import add_eval_commands

    args = add_eval_commands(argparse.ArgumentParser(prog="dinoscale eval")).parse_args(list(argv))
    args.handler(args)


def submit_eval(argv: Sequence[str], folder: str | Path, resources: JobResources) -> submitit.Job:
    executor = build_executor(folder, resources, name="dinoscale-eval", tasks=1)
    return submit(executor, eval_task, list(argv))


def dry_run_eval(argv: Sequence[str], folder: str | Path, resources: JobResources) -> str:
    executor = build_executor(folder, resources, name="dinoscale-eval", tasks=1, check=False)
    return dry_run_script(executor, eval_task, list(argv))


def follow_hint(job: submitit.Job) -> str:
    """Where a submitted job's log is and how to follow it."""
    if isinstance(job, submitit.SlurmJob):
        return (f"submitted job {job.job_id}\n  log: {job.paths.stdout}\n  follow: tail -f {job.paths.stdout}; "
                f"squeue -j {job.job_id}; sacct -j {job.job_id} --format=JobID,State,Elapsed,ExitCode")
    return f"started local job {job.job_id}\n  log: {job.paths.stdout}"
