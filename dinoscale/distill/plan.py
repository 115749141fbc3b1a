"""Who does what in a distillation job, checked before any work: the students' rank groups, their
configs, and which images of the global batch each rank feeds the teacher and each student.

The global batch of G images is split twice. For the teacher, over all W ranks: rank r loads and
runs the teacher on images [r*G/W, (r+1)*G/W). For each student, over its own group of g ranks: the
group's i-th rank trains on images [i*G/g, (i+1)*G/g). So the teacher sees every image once and
every student trains on the whole global batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from dinoscale.config import apply_overrides
from dinoscale.distill.teacher import teacher_run_config
from dinoscale.errors import ConfigError

# keys every student shares with the job: the data, crops and masks the teacher's targets are made
# for, the run length and checkpoint steps all groups keep in step, the teacher temperature
JOB_WIDE_KEYS = ("seed", "distill.", "crops.", "ibot.mask_", "train.dataset_path", "train.sources",
                 "train.homogeneous_batch_fraction", "train.iterations", "train.max_iterations",
                 "train.OFFICIAL_EPOCH_LENGTH", "train.checkpoint_period_iterations", "train.output_dir",
                 "train.batch_size_per_gpu", "optim.epochs", "teacher.warmup_teacher_temp", "teacher.teacher_temp",
                 "teacher.warmup_teacher_temp_epochs", "train.mixed_precision")


@dataclass(frozen=True)
class Student:
    name: str
    ranks: tuple[int, ...]
    cfg: DictConfig  # the whole config of this student's run (its own output_dir, per-rank batch)

    def share(self, group_rank: int, global_batch: int) -> range:
        """Images of the global batch that the group's `group_rank`-th rank trains on."""
        size = global_batch // len(self.ranks)
        return range(group_rank * size, (group_rank + 1) * size)


@dataclass(frozen=True)
class DistillPlan:
    world_size: int
    global_batch: int
    students: tuple[Student, ...]
    teacher_cfg: DictConfig

    def teacher_share(self, rank: int) -> range:
        """Images of the global batch that `rank` loads and runs the teacher on."""
        size = self.global_batch // self.world_size
        return range(rank * size, (rank + 1) * size)

    def student_of(self, rank: int) -> tuple[int, Student]:
        return next((i, s) for i, s in enumerate(self.students) if rank in s.ranks)

    def student_share(self, rank: int) -> range:
        _, student = self.student_of(rank)
        return student.share(student.ranks.index(rank), self.global_batch)

    def stream_cfg(self, cfg: DictConfig) -> DictConfig:
        """The job's config as the data stream reads it: the teacher's share per rank, its patch grid
        for the iBOT masks."""
        return apply_overrides(cfg, [f"train.batch_size_per_gpu={self.global_batch // self.world_size}",
                                     f"student.patch_size={self.teacher_cfg.student.patch_size}"], "distillation")


def make_plan(cfg: DictConfig, world_size: int) -> DistillPlan:
    """The plan of `cfg`'s distillation on `world_size` ranks; a ConfigError names the first problem."""
    spec = cfg.distill
    if not spec.students:
        raise ConfigError("distill.students is empty: give each student a name, a ranks_range [first, end) and "
                          "its overrides (e.g. student.arch=vit_small)")
    teacher_cfg = teacher_run_config(spec.teacher)
    groups = _rank_groups(spec.students, world_size)
    global_batch = spec.global_batch_size
    for size in {world_size, *(len(g) for g in groups)}:
        if global_batch <= 0 or global_batch % size:
            raise ConfigError(f"distill.global_batch_size = {global_batch} must be a positive multiple of the world "
                              f"size {world_size} and of every student's group size ({size} does not divide it)")
    students = []
    for index, (entry, ranks) in enumerate(zip(spec.students, groups)):
        source = f"distill.students[{index}] ({entry.name})"
        shared = [o for o in entry.overrides if o.split("=", 1)[0].startswith(JOB_WIDE_KEYS)]
        if shared:
            raise ConfigError(f"{source} overrides {shared[0].split('=', 1)[0]}, which every student shares with the "
                              "job; set it for the whole job instead")
        run_dir = Path(cfg.train.output_dir) / entry.name
        student_cfg = apply_overrides(cfg, [*entry.overrides, f"train.output_dir={run_dir}",
                                            f"train.batch_size_per_gpu={global_batch // len(ranks)}"], source)
        _check_student(student_cfg, teacher_cfg, source)
        students.append(Student(entry.name, ranks, student_cfg))
    return DistillPlan(world_size, global_batch, tuple(students), teacher_cfg)


def _rank_groups(entries, world_size: int) -> list[tuple[int, ...]]:
    names = [e.name for e in entries]
    if any(not n for n in names) or len(set(names)) < len(names):
        raise ConfigError(f"distill.students need distinct non-empty names (got {names})")
    groups, owner = [], {}
    for entry in entries:
        if len(entry.ranks_range) != 2 or not 0 <= entry.ranks_range[0] < entry.ranks_range[1]:
            raise ConfigError(f"student '{entry.name}': ranks_range = {list(entry.ranks_range)} must be [first, end) "
                              "with 0 <= first < end")
        ranks = tuple(range(*entry.ranks_range))
        for r in ranks:
            if r in owner:
                raise ConfigError(f"students '{owner[r]}' and '{entry.name}' both claim rank {r}: rank groups must "
                                  "not overlap")
            owner[r] = entry.name
        groups.append(ranks)
    if set(owner) != set(range(world_size)):
        idle = sorted(set(range(world_size)) - set(owner))
        extra = sorted(set(owner) - set(range(world_size)))
        problem = f"ranks {idle} have no student" if idle else f"ranks {extra} do not exist"
        raise ConfigError(f"the students' rank groups must cover the {world_size} ranks of the job exactly: {problem}; "
                          "fix distill.students[].ranks_range or the number of processes")
    return groups


def _check_student(cfg: DictConfig, teacher_cfg: DictConfig, source: str) -> None:
    patch = cfg.student.patch_size
    for key in ("global_crops_size", "local_crops_size"):
        size = cfg.crops[key]
        if size % patch:
            raise ConfigError(f"crops.{key} = {size} is not a multiple of {source}'s patch size {patch}; "
                              "choose crop sizes that every student's patch size divides")
    if patch != teacher_cfg.student.patch_size:
        raise ConfigError(f"{source} has patch size {patch} and the teacher {teacher_cfg.student.patch_size}: the "
                          "iBOT targets are per patch, so students need the teacher's patch size")
    teacher_ibot = teacher_cfg.ibot if teacher_cfg.ibot.separate_head else teacher_cfg.dino
    student_ibot = cfg.ibot if cfg.ibot.separate_head else cfg.dino
    for what, mine, theirs in (("dino.head_n_prototypes", cfg.dino.head_n_prototypes, teacher_cfg.dino.head_n_prototypes),
                               ("iBOT prototypes", student_ibot.head_n_prototypes, teacher_ibot.head_n_prototypes)):
        if mine != theirs:
            raise ConfigError(f"{source}: {what} = {mine}, the teacher's heads have {theirs}; the student predicts the "
                              "teacher's prototype assignments, so the counts must match")
    unsupported = [(cfg.gram.use_loss, "gram.use_loss"), (cfg.dino.koleo_loss_distributed, "dino.koleo_loss_distributed"),
                   (bool(cfg.student.pretrained_weights), "student.pretrained_weights")]
    for on, key in unsupported:
        if on:
            raise ConfigError(f"{source}: {key} is not supported in distillation (KoLeo runs per rank as in DINOv3's "
                              "multi-distillation; students start from scratch without Gram anchoring); unset it")
