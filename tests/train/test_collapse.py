"""DINO's anti-collapse mechanism on a small pool, and its counterfactual.

The small-pool preset (`train/small_pool`) trains a tiny ViT for a few hundred steps on the
synthetic pool. Its teacher's outputs stay away from both collapses (one prototype: marginal
entropy 0; uniform: per-image entropy log K) and carry information about the image, and its
features beat the same network at random initialisation in a cosine k-NN. Without
Sinkhorn-Knopp or centering and without sharpening (teacher temperature = student
temperature, plain softmax targets) the same run collapses, as the DINO paper predicts.

Everything is measured on held-out labelled images from the trained teacher loaded from the
run's last checkpoint, independently of the training code. What collapses in the
counterfactual is the teacher's output, which stops depending on the image (its mutual
information with the image goes to 0); its backbone features do not, because KoLeo, part of
the same run, keeps spreading them, so the test does not compare the two runs' k-NN.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dinoscale.config import load_config
from dinoscale.data.augment import IMAGENET_MEAN, IMAGENET_STD
from dinoscale.data.synthetic import SyntheticSpec, make_synthetic_pool
from dinoscale.train.checkpoint import latest_checkpoint, load_checkpoint
from dinoscale.train.ssl import SSLMetaArch
from dinoscale.train.trainer import train

pytestmark = pytest.mark.slow

EPOCHS = 3  # of the preset's 100 iterations: 300 steps of 64 images


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic_pool(root, SyntheticSpec(n_images=1000, eval_per_class=50))
    return root


def labelled_images(folder, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for label, class_dir in enumerate(sorted(p for p in folder.iterdir() if p.is_dir())):
        for path in sorted(class_dir.iterdir()):
            image = Image.open(path).convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
            images.append(torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255)
            labels.append(label)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (torch.stack(images) - mean) / std, torch.tensor(labels)


def knn_accuracy(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, labels: torch.Tensor,
                 k: int = 20) -> float:
    """Cosine k-NN, each neighbour voting for its class with weight exp(similarity / 0.07)."""
    similarity = F.normalize(queries, dim=-1) @ F.normalize(bank, dim=-1).T
    top, index = similarity.topk(k, dim=1)
    votes = torch.zeros(len(queries), int(bank_labels.max()) + 1).scatter_add_(1, bank_labels[index], (top / 0.07).exp())
    return float((votes.argmax(dim=1) == labels).float().mean())


@torch.no_grad()
def teacher_report(model: SSLMetaArch, temperature: float, data) -> dict[str, float]:
    (train_x, train_y), (test_x, test_y) = data
    backbone, head = model.teacher.backbone.eval(), model.teacher.dino_head
    features = {name: backbone(x).float() for name, x in (("train", train_x), ("test", test_x))}
    log_probs = torch.log_softmax(head(features["test"]).float() / temperature, dim=-1)
    probs = log_probs.exp()
    mean_probs = probs.mean(dim=0)
    entropy = float(-(probs * log_probs).sum(dim=-1).mean())  # log K: every output uniform
    marginal_entropy = float(-(mean_probs * mean_probs.clamp_min(1e-12).log()).sum())  # 0: one prototype
    # mutual information between image and prototype: 0 in both collapses (the output ignores the input)
    return {"knn": knn_accuracy(features["train"], train_y, features["test"], test_y), "entropy": entropy,
            "marginal_entropy": marginal_entropy, "information": marginal_entropy - entropy}


def trained_teacher(cfg) -> SSLMetaArch:
    train(cfg)
    model = SSLMetaArch(cfg)
    load_checkpoint(latest_checkpoint(cfg.train.output_dir), model, optimizer=None)
    return model


def test_dino_learns_on_a_small_pool_and_collapses_without_balancing_and_sharpening(synthetic, tmp_path):
    def config(run: str, *extra: str):
        return load_config("train/small_pool", [f"train.dataset_path={synthetic / 'pool'}",
                                                f"train.output_dir={tmp_path / run}", f"optim.epochs={EPOCHS}", *extra])

    cfg = config("recipe")
    data = [labelled_images(synthetic / split, cfg.crops.global_crops_size) for split in ("eval_train", "eval_test")]
    log_k = math.log(cfg.dino.head_n_prototypes)

    torch.manual_seed(cfg.seed)  # the trainer initialises from the same seed
    at_init = teacher_report(SSLMetaArch(cfg), cfg.teacher.teacher_temp, data)
    trained = teacher_report(trained_teacher(cfg), cfg.teacher.teacher_temp, data)

    student_temp = cfg.dino.student_temp
    counterfactual = config("counterfactual", "train.centering=none", f"teacher.warmup_teacher_temp={student_temp}",
                            f"teacher.teacher_temp={student_temp}")
    collapsed = teacher_report(trained_teacher(counterfactual), student_temp, data)

    print({"init": at_init, "trained": trained, "counterfactual": collapsed, "log_k": log_k})
    assert trained["marginal_entropy"] > 0.4 * log_k, "the teacher puts every image on a few prototypes"
    assert trained["entropy"] < 0.75 * log_k, "the teacher's outputs are nearly uniform"
    assert trained["information"] > 0.25, "the teacher's output hardly depends on the image"
    assert trained["knn"] > at_init["knn"] + 0.05
    # collapse, in either direction, makes the teacher's output independent of the image
    assert collapsed["information"] < 0.1 and collapsed["information"] < 0.25 * trained["information"]
