"""Building the SSL model for training without a full copy of it on any rank.

The student, EMA teacher and Gram teacher are created on the meta device, sharded with FSDP2
(`parallelize`), allocated shard by shard (`to_empty`) and initialised by replaying eager
construction one module at a time (`dinoscale.models.init.materialize`): the weights equal those
of `torch.manual_seed(cfg.seed); SSLMetaArch(cfg)` on any number of ranks. Pretrained backbone
weights are read by rank 0 alone and broadcast into the shards; a teacher with its heads
(`student.resume_from_teacher_chkpt`) by `dinoscale.train.teacher_weights`.

Peak host memory per rank: the shards of the three branches, plus the full tensors of one module
(the largest is a block's feed-forward matrix or a head's prototype layer) — and, on rank 0 with
pretrained weights, one full backbone.
"""

from __future__ import annotations

import copy

import torch
from omegaconf import DictConfig
from torch.distributed.device_mesh import DeviceMesh

from dinoscale.errors import ConfigError
from dinoscale.models.init import eager_init_steps, materialize, run_steps
from dinoscale.models.loading import load_backbone
from dinoscale.train.optim import build_optimizer
from dinoscale.train.parallel import fill_from_rank0, parallelize
from dinoscale.train.ssl import BRANCHES, SSLMetaArch, copy_weights, student_init_steps
from dinoscale.train.teacher_weights import load_teacher_with_heads
from dinoscale.utils.device import autocast_dtype
from dinoscale.utils.logging import get_logger

log = get_logger(__name__)


def build_sharded_model(cfg: DictConfig, device: torch.device, world_size: int,
                        mesh: DeviceMesh | None = None) -> SSLMetaArch:
    """The SSL model sharded over the process group, or over `mesh` (compute dtype, activation
    checkpointing and compile as configured), initialised as eager construction would, pretrained
    weights loaded."""
    if cfg.student.pretrained_weights and cfg.student.resume_from_teacher_chkpt:
        raise ConfigError("set student.pretrained_weights (a backbone, fresh heads) or "
                          "student.resume_from_teacher_chkpt (a teacher with its heads), not both")
    with torch.device("meta"):
        model = SSLMetaArch(cfg)
    source = copy.deepcopy(model.student)  # stays on meta: the init steps run on it module by module
    compute_dtype = autocast_dtype(device, cfg.train.mixed_precision) or torch.float32
    parallelize(model.branches(), device, world_size, compute_dtype, cfg.train.activation_checkpointing,
                cfg.train.compile, checkpointed=[model.student], mesh=mesh)
    model.to_empty(device=device)
    torch.manual_seed(cfg.seed)
    materialize(source, student_init_steps(source), model.branches())
    for name, child in model.named_children():
        if name not in BRANCHES:  # the losses' centres: small, unsharded
            run_steps(eager_init_steps(child))
    if cfg.student.pretrained_weights:
        load_pretrained_backbone(model, cfg.student.pretrained_weights)
    if cfg.student.resume_from_teacher_chkpt:
        load_teacher_with_heads(model, cfg.student.resume_from_teacher_chkpt)
    return model


def build_model(cfg: DictConfig, device: torch.device, world_size: int,
                mesh: DeviceMesh | None = None) -> tuple[SSLMetaArch, torch.optim.AdamW]:
    """The sharded SSL model and its optimizer."""
    model = build_sharded_model(cfg, device, world_size, mesh)
    return model, build_optimizer(model.student, cfg.optim)


@torch.no_grad()
def load_pretrained_backbone(model: SSLMetaArch, path: str) -> None:
    """Continued pretraining: official DINOv2/DINOv3 (or exported) backbone weights into the student
    and both teachers (fresh heads). Rank 0 reads the file; the shards are filled by broadcast."""
    fill_from_rank0(model.student.backbone, lambda: load_backbone(path, arch=model.student.backbone.spec).state_dict())
    for branch in model.branches()[1:]:
        copy_weights(model.student.backbone, branch.backbone)
    log.info("initialised student and teachers from %s", path)
