"""Run under torchrun by tests/distill: distillation jobs on real processes, with what the tests
compare written to OUT. `python distill_ranks.py OUT CONFIG [CONFIG ...]` runs each config's job
for its iterations and writes, per student (by the group's first rank), OUT/NAME.pt: the metrics of
every step, the full gradients of the first step and the final student weights; per rank,
OUT/batch_rankR.pt: the student batch the rank received at the first step; and (rank 0)
OUT/teacher_crops.json: a hash of every global crop the teacher's backbone received, over all ranks."""

import hashlib
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from dinoscale.config import load_config
from dinoscale.distill.job import DistillJob
from dinoscale.distributed import DistInfo, process_group


def run(config: str, out: Path, info: DistInfo) -> None:
    job = DistillJob(load_config(config), info)
    seen = []
    job.teacher.modules.backbone.register_forward_pre_hook(
        lambda module, args: seen.extend(hashlib.sha1(c.numpy().tobytes()).hexdigest() for c in args[0]))
    received = []
    share_out = job.routing.student_batch
    job.routing.student_batch = lambda *args: received.append(share_out(*args)) or received[-1]
    batches = job.batches(0)
    steps, first_grads = [], None
    for iteration in range(job.n_iterations):
        steps.append(job.step(next(batches), iteration))
        if iteration == 0:
            first_grads = {n: p.grad.full_tensor() for n, p in job.model.student.named_parameters()
                           if p.grad is not None}
    weights = {n: p.full_tensor() for n, p in job.model.student.named_parameters()}
    ema = {n: p.full_tensor() for n, p in job.model.teacher.named_parameters()}
    if job.group_rank == 0:
        torch.save({"steps": steps, "grads": first_grads, "weights": weights, "ema": ema}, out / f"{job.student.name}.pt")
    first = {k: received[0][k] for k in ("collated_global_crops", "collated_masks", "cls_probs", "masked_patch_probs")}
    torch.save({**first, "share": list(job.plan.student_share(info.rank))}, out / f"batch_rank{info.rank}.pt")
    everyone = [None] * info.world_size
    dist.all_gather_object(everyone, seen)
    if info.rank == 0:
        (out / "teacher_crops.json").write_text(json.dumps(everyone))


if __name__ == "__main__":
    out = Path(sys.argv[1])
    with process_group() as info:
        for config in sys.argv[2:]:
            target = out / Path(config).stem
            target.mkdir(parents=True, exist_ok=True)
            run(config, target, info)
