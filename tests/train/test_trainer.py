"""The scalable trainer: 2 real processes under torchrun (gloo) against one process in fp32 and
bf16, resume, signals, activation checkpointing, bf16, export and continued pretraining."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from dinoscale.config import load_config
from dinoscale.data.pool import open_pool
from dinoscale.eval.dense import evaluate_dense_backbone
from dinoscale.eval.dense_data import open_dense_datasets
from dinoscale.eval.evaluate import evaluate_knn, knn_metrics
from dinoscale.models import build_backbone, load_backbone
from dinoscale.models.loading import read_training_record
from dinoscale.train.checkpoint import checkpoint_dirs, load_checkpoint, save_checkpoint
from dinoscale.train.export import export_run
from dinoscale.eval.report import read_metrics
from dinoscale.train.optim import apply_schedules, build_optimizer
from dinoscale.train.parallel import apply_activation_checkpointing
from dinoscale.losses.koleo import KoLeoLoss
from dinoscale.train.ssl import N_GLOBAL_CROPS, SSLMetaArch
from dinoscale.train.schedules import build_schedules
from dinoscale.train.trainer import NonFiniteLossError, train
from dinoscale.data.stream import build_stream

from tiny_run import LOSS_TERMS, write_tiny_run


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return write_tiny_run(tmp_path_factory.mktemp("trainer"))


def _overrides(workdir, run, *extra):
    return [f"train.dataset_path={workdir / 'data' / 'pool'}", f"train.output_dir={workdir / run}", *extra]


def _cli(workdir, run, *extra, nproc=1, wait=True):
    command = [sys.executable, "-m", "dinoscale.cli", "train", str(workdir / "tiny.yaml"), *_overrides(workdir, run, *extra)]
    if nproc > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                   *command[1:]]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if not wait:
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _losses(run_dir):
    metrics = run_dir / "metrics.jsonl"
    return {m["iteration"]: m for m in read_metrics(metrics)} if metrics.exists() else {}


@pytest.fixture(scope="module")
def single_run(workdir):
    _cli(workdir, "single")
    return workdir / "single"


@pytest.fixture(scope="module")
def two_rank_run(workdir):
    _cli(workdir, "two_ranks", "train.batch_size_per_gpu=2", nproc=2)
    return workdir / "two_ranks"


def _assert_same_losses(a, b, iterations, tol=1e-5):
    for it in iterations:
        for term in LOSS_TERMS:
            if term in a[it]:
                assert abs(a[it][term] - b[it][term]) < tol, (it, term, a[it][term], b[it][term])


@pytest.mark.distributed
@pytest.mark.slow
def test_two_ranks_match_one_process_on_the_same_global_batch(single_run, two_rank_run):
    single, double = _losses(single_run), _losses(two_rank_run)
    assert sorted(single) == sorted(double) == list(range(6))
    assert "gram_loss" in single[5] and "koleo_loss" in single[5] and "ibot_loss" in single[5]
    _assert_same_losses(single, double, range(6))


@pytest.mark.distributed
@pytest.mark.slow
def test_two_ranks_match_one_process_in_bf16(workdir):
    # a single process is a world of one, sharded and cast as 2 ranks are (bf16 blocks, fp32 residual stream)
    common = ("train.mixed_precision=bf16", "train.max_iterations=4")
    _cli(workdir, "bf16_single", *common)
    _cli(workdir, "bf16_two_ranks", *common, "train.batch_size_per_gpu=2", nproc=2)
    single, double = _losses(workdir / "bf16_single"), _losses(workdir / "bf16_two_ranks")
    assert sorted(single) == sorted(double) == list(range(4)) and "gram_loss" in single[3]
    # iterations 0 and 1 see the initial weights (the learning rate starts at 0): only reductions differ
    _assert_same_losses(single, double, range(2), tol=5e-4)
    # then AdamW's normalised steps amplify the rounding of bf16 gradients
    _assert_same_losses(single, double, range(2, 4), tol=2e-2)


@pytest.mark.distributed
@pytest.mark.slow
def test_checkpoint_of_two_ranks_resumes_in_one_process(workdir, two_rank_run):
    resumed = workdir / "resumed_from_two"
    resumed.mkdir()
    # continue the 2-rank run's checkpoint of iteration 2 in a single process
    source = two_rank_run / "checkpoints" / "step_0000002"
    (resumed / "checkpoints").mkdir()
    subprocess.run(["cp", "-r", str(source), str(resumed / "checkpoints")], check=True)
    done = _cli(workdir, "resumed_from_two", "train.batch_size_per_gpu=4")
    assert "resumed from" in done.stderr
    _assert_same_losses(_losses(two_rank_run), _losses(resumed), range(3, 6))


def _wait_for_iteration(run_dir, iteration, process, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if max(_losses(run_dir), default=-1) >= iteration:
            return
        assert process.poll() is None, process.stdout.read()[-3000:]
        time.sleep(0.02)
    raise TimeoutError(f"iteration {iteration} not reached")


@pytest.mark.slow
def test_sigkill_between_checkpoints_then_resume_ends_with_the_same_weights(workdir, single_run):
    run = workdir / "killed"
    process = _cli(workdir, "killed", "train.checkpoint_period_iterations=2", wait=False)
    _wait_for_iteration(run, 2, process)  # checkpoint at 1 exists, 2 is past it
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert [p.name for p in checkpoint_dirs(run)][-1] in ("step_0000001", "step_0000003")
    done = _cli(workdir, "killed", "train.checkpoint_period_iterations=2")
    assert "resumed from" in done.stderr
    a = torch.load(run / "export" / "teacher.pth", weights_only=True)["model"]
    b = torch.load(single_run / "export" / "teacher.pth", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR2])
def test_signal_writes_a_complete_checkpoint_before_exit(workdir, sig):
    run = workdir / f"signalled_{sig.name}"
    process = _cli(workdir, run.name, "train.checkpoint_period_iterations=100", "optim.epochs=50", wait=False)
    _wait_for_iteration(run, 1, process)
    process.send_signal(sig)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-3000:]
    assert "stop requested" in output
    (checkpoint,) = checkpoint_dirs(run)
    meta = json.loads((checkpoint / "meta.json").read_text())
    assert checkpoint.name == f"step_{meta['iteration']:07d}" and (checkpoint / ".metadata").exists()
    assert meta["iteration"] < 299 and not list((run / "checkpoints").glob(".tmp*"))


def _one_batch(cfg):
    return build_stream(cfg, rank=0, world_size=1, start_step=0).batch(0)


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_gives_the_same_gradients(workdir, mode):
    cfg = load_config(str(workdir / "tiny.yaml"), _overrides(workdir, "unused"))
    batch = _one_batch(cfg)
    grads = []
    for checkpointing in ("none", mode):
        torch.manual_seed(0)
        model = SSLMetaArch(cfg)
        apply_activation_checkpointing(model.student.backbone.blocks, checkpointing)
        model.forward_backward(batch, iteration=0, teacher_temp=cfg.teacher.warmup_teacher_temp)
        grads.append({n: p.grad.clone() for n, p in model.student.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-6)


def test_a_checkpoint_of_the_unfused_adamw_resumes_on_the_fused_kernel(workdir, tmp_path):
    cfg = load_config(str(workdir / "tiny.yaml"), _overrides(workdir, "unused"))
    batch = _one_batch(cfg)
    model = SSLMetaArch(cfg)
    saved = build_optimizer(model.student, cfg.optim)
    for group in saved.param_groups:  # as a checkpoint written before fused AdamW has them
        group.update(fused=None, foreach=None)
    schedules = build_schedules(cfg, 4)
    apply_schedules(saved, schedules, 2)
    model.forward_backward(batch, iteration=2, teacher_temp=schedules.teacher_temperature(2))
    saved.step()
    checkpoint = save_checkpoint(tmp_path, 2, model, saved, {}, keep_last=1)

    resumed_model = SSLMetaArch(cfg)
    resumed = build_optimizer(resumed_model.student, cfg.optim)
    load_checkpoint(checkpoint, resumed_model, resumed)
    assert resumed.defaults["fused"] and all(group["fused"] for group in resumed.param_groups)
    pairs = [(old, new) for old, new in zip(model.student.parameters(), resumed_model.student.parameters())
             if old in saved.state]
    assert len(pairs) > 10
    for old, new in pairs:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(saved.state[old][key], resumed.state[new][key]), key
    resumed_model.forward_backward(batch, iteration=3, teacher_temp=schedules.teacher_temperature(3))
    resumed.step()  # the fused kernel takes the loaded state (its step counters as float32 tensors)
    assert all(resumed.state[new]["step"].item() == 2 for _, new in pairs)


def test_bf16_mixed_precision_trains(workdir):
    cfg = load_config(str(workdir / "tiny.yaml"),
                      _overrides(workdir, "bf16", "train.mixed_precision=bf16", "train.max_iterations=4"))
    exported = train(cfg)
    losses = _losses(workdir / "bf16")
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(m["total_loss"])) for m in losses.values())
    assert load_backbone(exported).embed_dim == 32


def test_online_knn_logs_the_teacher_accuracy_every_period(workdir):
    data = workdir / "data"
    # no eval.image_size: the online k-NN runs at the global crop size, 16 px
    eval_overrides = [f"eval.train_dataset={data / 'eval_train'}", f"eval.val_dataset={data / 'eval_test'}",
                      "eval.num_workers=0", "eval.knn_k=[1,3]"]
    cfg = load_config(str(workdir / "tiny.yaml"), _overrides(workdir, "online_knn", "train.max_iterations=4",
                                                                 "eval.online_knn_period_iterations=2", *eval_overrides))
    exported = train(cfg)
    logged = _losses(workdir / "online_knn")
    knn_keys = {"knn_top1_k1", "knn_top1_k3", "knn_top5_k1", "knn_top5_k3"}
    assert [sorted(knn_keys & set(m)) for _, m in sorted(logged.items())] == [[], sorted(knn_keys)] * 2
    # the last one is the k-NN of the teacher the run exports, evaluated on its own
    expected = evaluate_knn(load_backbone(exported), open_pool(data / "eval_train"), open_pool(data / "eval_test"),
                            load_config(None, [*eval_overrides, "eval.image_size=16"]).eval)
    assert {k: logged[3][k] for k in knn_keys} == knn_metrics(expected)


def test_online_dense_probes_log_the_teachers_miou_and_depth_error_every_period(workdir):
    data = workdir / "data"
    dense = [f"eval.dense.{role}_{what}={data / split}{suffix}" for role, split in (("train", "eval_train"),
                                                                                     ("val", "eval_test"))
             for what, suffix in (("dataset", ""), ("masks", "_segmentation"), ("depth", "_depth"))]
    eval_overrides = [*dense, "eval.dense.image_size=24", "eval.num_workers=0", "eval.dense.epochs=2",
                      "eval.dense.lrs=[0.1]", "eval.dense.weight_decays=[0.0]", "eval.dense.depth_n_bins=16"]
    cfg = load_config(str(workdir / "tiny.yaml"), _overrides(workdir, "online_dense", "train.max_iterations=4",
                                                                 "eval.online_dense_period_iterations=2",
                                                                 *eval_overrides))
    exported = train(cfg)
    logged = _losses(workdir / "online_dense")
    dense_keys = {"segmentation_miou", "segmentation_pixel_accuracy", "depth_rmse", "depth_delta1", "depth_abs_rel"}
    assert [sorted(dense_keys & set(m)) for _, m in sorted(logged.items())] == [[], sorted(dense_keys)] * 2
    # the last one is the dense evaluation of the teacher the run exports, evaluated on its own
    eval_cfg = load_config(None, eval_overrides).eval
    expected = evaluate_dense_backbone(load_backbone(exported), *open_dense_datasets(eval_cfg.dense), eval_cfg)
    assert {k: logged[3][k] for k in dense_keys} == pytest.approx(expected.metrics())


def test_a_non_finite_term_stops_the_run_naming_it_and_keeps_the_last_good_checkpoint(workdir, monkeypatch):
    koleo_forward = KoLeoLoss.forward
    calls = []

    def koleo_turning_nan_at_iteration_4(self, x):
        calls.append(1)  # one call per global crop
        loss = koleo_forward(self, x)
        return loss * float("nan") if len(calls) > 4 * N_GLOBAL_CROPS else loss

    monkeypatch.setattr(KoLeoLoss, "forward", koleo_turning_nan_at_iteration_4)
    run = workdir / "non_finite"
    cfg = load_config(str(workdir / "tiny.yaml"), _overrides(workdir, "non_finite", "train.max_iterations=6"))
    with pytest.raises(NonFiniteLossError) as error:
        train(cfg)
    message = str(error.value)
    assert "koleo_loss" in message and "total_loss" in message and "iteration 4" in message
    assert "step_0000002" in message  # checkpoints every 3 iterations: the one after iteration 2
    assert [d.name for d in checkpoint_dirs(run)] == ["step_0000002"]
    assert sorted(_losses(run)) == [0, 1, 2, 3]  # the failed step is not logged


@pytest.mark.slow
def test_compiled_blocks_train_with_the_eager_losses(workdir, single_run):
    # iterations 0-3 run every branch: student, teacher and (from iteration 3) the Gram teacher
    cfg = load_config(str(workdir / "tiny.yaml"),
                      _overrides(workdir, "compiled", "train.compile=true", "train.max_iterations=4"))
    train(cfg)
    _assert_same_losses(_losses(single_run), _losses(workdir / "compiled"), range(4), tol=1e-4)


def test_export_and_load_backbone_give_identical_features(workdir, single_run):
    exported = load_backbone(single_run / "export" / "teacher.pth").eval()
    re_exported = load_backbone(export_run(single_run, workdir / "re_export.pth")).eval()
    for path in (single_run / "export" / "teacher.pth", workdir / "re_export.pth"):  # evaluations default to it
        assert read_training_record(path) == {"global_crops_size": 16, "local_crops_size": 8}
    images = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(exported(images), re_exported(images), rtol=0, atol=0)


def test_continued_pretraining_from_an_official_layout_file(workdir):
    cfg = load_config(str(workdir / "tiny.yaml"), _overrides(workdir, "continued"))
    torch.manual_seed(123)
    official = build_backbone(cfg.student).state_dict()  # our parameter names are the official key layout
    weights = workdir / "official_layout.pth"
    torch.save(official, weights)  # a bare state dict, as the official releases ship
    cfg = load_config(str(workdir / "tiny.yaml"), _overrides(workdir, "continued", f"student.pretrained_weights={weights}",
                                                                 "train.max_iterations=1"))
    exported = torch.load(train(cfg), weights_only=True)["model"]
    # iteration 0 has learning rate 0 (warm-up starts at 0), so the teacher still holds the file's weights
    for key, value in official.items():
        torch.testing.assert_close(exported[key], value)
