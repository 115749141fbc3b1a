"""Run on every rank (torchrun, or alone as a world of one): build the SSL model on meta, shard it,
materialise it, and compare each full tensor with eager construction of the same seed; then the
same with pretrained backbone weights (written into the folder argv[1]), and a missing weights file. Prints one JSON line
per case on rank 0."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from dinoscale.config import load_config
from dinoscale.errors import CheckpointError
from dinoscale.models import build_backbone
from dinoscale.models.loading import load_backbone, save_backbone
from dinoscale.train.build import build_sharded_model
from dinoscale.distributed import process_group
from dinoscale.train.ssl import SSLMetaArch

TINY = ["student.embed_dim=32", "student.depth=2", "student.num_heads=2", "student.patch_size=4",
        "student.img_size=16", "dino.head_n_prototypes=63", "dino.head_hidden_dim=40", "dino.head_bottleneck_dim=16",
        "ibot.head_n_prototypes=33", "ibot.head_hidden_dim=40", "ibot.head_bottleneck_dim=16",
        "train.batch_size_per_gpu=2", "train.OFFICIAL_EPOCH_LENGTH=10", "optim.epochs=1", "train.mixed_precision=fp32"]
# DINOv2 layout (learned position embedding, registers, LayerScale); DINOv3 (RoPE, unfused SwiGLU,
# masked key bias, untied norms, Gram teacher); a shared iBOT head with RMSNorm and fused SwiGLU
CONFIGS = {
    "dinov2": ["seed=3", "student.n_storage_tokens=3", "student.layerscale=1e-5"],
    "dinov3_gram": ["seed=5", "student.arch=dinov3_vits16plus", "student.untie_cls_and_patch_norms=true",
                    "student.untie_global_and_local_cls_norm=true", "gram.use_loss=true"],
    "shared_head": ["seed=7", "ibot.separate_head=false", "student.norm_layer=rmsnorm", "student.ffn_layer=swiglu",
                    "train.activation_checkpointing=selective"],
}


def full_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True))


def write_weights(folder: Path, name: str, overrides: list[str]) -> Path:
    """Backbone weights of the config's architecture, other than its initial ones (rank 0 writes)."""
    path = folder / f"{name}.pth"
    if torch.distributed.get_rank() == 0:
        torch.manual_seed(100)
        save_backbone(build_backbone(load_config(None, TINY + overrides).student), path)
    torch.distributed.barrier()
    return path


def main(folder: Path) -> None:
    with process_group() as info:
        cases = [(name, overrides, None) for name, overrides in CONFIGS.items()]
        cases += [(f"{name}_pretrained", overrides, write_weights(folder, name, overrides))
                  for name, overrides in CONFIGS.items()]
        for name, overrides, pretrained in cases:
            if pretrained:
                overrides = [*overrides, f"student.pretrained_weights={pretrained}"]
            cfg = load_config(None, TINY + overrides)
            torch.manual_seed(cfg.seed)
            eager = SSLMetaArch(cfg)  # today's construction: every tensor built and initialised in full
            eager_rng = torch.get_rng_state()
            if pretrained:
                weights = load_backbone(pretrained, arch=eager.student.backbone.spec).state_dict()
                for branch in eager.branches():
                    branch.backbone.load_state_dict(weights)
            sharded = build_sharded_model(cfg, info.device, info.world_size)
            same_rng = torch.equal(torch.get_rng_state(), eager_rng)
            expected = eager.state_dict()
            got = {f"{b}.{k}": v for b in ("student", "teacher", "gram_teacher") if getattr(sharded, b) is not None
                   for k, v in full_state(getattr(sharded, b)).items()}
            got.update({k: v for k, v in sharded.state_dict().items() if not k.startswith(("student.", "teacher.",
                                                                                           "gram_teacher."))})
            different = sorted(k for k in expected if k not in got or not torch.equal(got[k].cpu(), expected[k]))
            sharded_params = sum(isinstance(p, torch.distributed.tensor.DTensor) for p in sharded.parameters())
            if info.rank == 0:
                print(json.dumps({"config": name, "world_size": info.world_size, "tensors": len(expected),
                                  "extra": sorted(set(got) - set(expected)), "different": different,
                                  "same_rng_state": same_rng, "sharded_params": sharded_params,
                                  "params": sum(1 for _ in sharded.parameters())}), flush=True)
        try:
            build_sharded_model(load_config(None, TINY + [f"student.pretrained_weights={folder / 'missing.pth'}"]),
                                info.device, info.world_size)
            error = None
        except CheckpointError as err:
            error = str(err)
        errors = [None] * info.world_size
        torch.distributed.all_gather_object(errors, error)
        if info.rank == 0:
            print(json.dumps({"config": "missing_weights", "errors": errors}), flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
