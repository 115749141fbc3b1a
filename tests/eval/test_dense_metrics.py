"""Dense-probe metrics and losses against their definitions, computed independently: a hand-made
confusion matrix and its IoUs, per-image depth RMSE / δ1 / AbsRel, SigLoss, depth bins, and
bilinear upsampling of per-patch outputs to the label size."""

import math

import numpy as np
import pytest
import torch

from dinoscale.eval.depth import depth_scores, depth_sums, outputs_to_depth, sig_loss, upsample_depth
from dinoscale.eval.segmentation import confusion_matrix, segmentation_loss, segmentation_scores, upsample

IGNORE = 255


def test_confusion_matrix_and_miou_of_a_hand_made_example():
    labels = torch.tensor([[0, 0, 1, 1],
                           [0, 2, 2, IGNORE],
                           [IGNORE, 2, 2, 1]])
    predicted = torch.tensor([[0, 1, 1, 1],
                              [0, 2, 0, 3],  # the 3 sits on an ignored pixel: not counted
                              [3, 2, 2, 2]])
    # true 0: predicted 0, 1, 0 | true 1: 1, 1, 2 | true 2: 2, 0, 2, 2
    expected = torch.tensor([[2, 1, 0, 0],
                             [0, 2, 1, 0],
                             [1, 0, 3, 0],
                             [0, 0, 0, 0]])
    confusion = confusion_matrix(predicted, labels, n_classes=4, ignore_index=IGNORE)
    assert torch.equal(confusion, expected)

    scores = segmentation_scores(confusion)
    # IoU = TP / (TP + FP + FN): class 0: 2 / (2 + 1 + 1), class 1: 2 / (2 + 1 + 1), class 2: 3 / (3 + 1 + 1);
    # class 3 is neither labelled nor predicted on a labelled pixel: left out of the mean
    iou = [2 / 4, 2 / 4, 3 / 5]
    assert scores.iou[:3] == pytest.approx([100 * v for v in iou])
    assert scores.iou[3] is None
    assert scores.miou == pytest.approx(100 * sum(iou) / 3)
    assert scores.pixel_accuracy == pytest.approx(100 * 7 / 10)  # 10 labelled pixels, 7 right
    assert scores.mean_accuracy == pytest.approx(100 * (2 / 3 + 2 / 3 + 3 / 4) / 3)


def test_a_class_predicted_but_never_labelled_counts_with_iou_zero():
    labels = torch.tensor([0, 0, 1, 1])
    predicted = torch.tensor([0, 2, 1, 1])
    scores = segmentation_scores(confusion_matrix(predicted, labels, 3, IGNORE))
    assert scores.iou == pytest.approx([50.0, 100.0, 0.0])
    assert scores.miou == pytest.approx(50.0)


def test_confusion_matrices_of_parts_add_up_to_the_whole():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (6, 9, 7), generator=g)
    labels[labels == 4] = IGNORE
    predicted = torch.randint(0, 4, (6, 9, 7), generator=g)
    whole = confusion_matrix(predicted, labels, 4, IGNORE)
    parts = confusion_matrix(predicted[:2], labels[:2], 4, IGNORE) + confusion_matrix(predicted[2:], labels[2:], 4,
                                                                                      IGNORE)
    assert torch.equal(whole, parts) and int(whole.sum()) == int((labels != IGNORE).sum())


def bilinear_reference(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of [C, h, w] to [C, H, W] with half-pixel centres (align_corners=False), written out."""
    c, h, w = maps.shape
    out = np.zeros((c, *size))
    for i in range(size[0]):
        for j in range(size[1]):
            y = min(max((i + 0.5) * h / size[0] - 0.5, 0), h - 1)
            x = min(max((j + 0.5) * w / size[1] - 0.5, 0), w - 1)
            y0, x0 = int(math.floor(y)), int(math.floor(x))
            y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
            dy, dx = y - y0, x - x0
            out[:, i, j] = ((1 - dy) * (1 - dx) * maps[:, y0, x0] + (1 - dy) * dx * maps[:, y0, x1]
                            + dy * (1 - dx) * maps[:, y1, x0] + dy * dx * maps[:, y1, x1])
    return out


def test_per_patch_outputs_are_upsampled_bilinearly_to_the_label_size():
    outputs = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(1))  # [B, h, w, C]
    maps = upsample(outputs, (12, 10))
    assert maps.shape == (2, 5, 12, 10)
    for b in range(2):
        expected = bilinear_reference(outputs[b].permute(2, 0, 1).numpy(), (12, 10))
        np.testing.assert_allclose(maps[b].numpy(), expected, atol=1e-5)
    depth = upsample_depth(outputs[..., 0], (7, 9))
    np.testing.assert_allclose(depth[1].numpy(), bilinear_reference(outputs[1, ..., :1].permute(2, 0, 1).numpy(),
                                                                      (7, 9))[0], atol=1e-5)


def test_segmentation_loss_is_the_mean_cross_entropy_over_labelled_pixels_at_label_size():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 3, 2, 2, 4, generator=g)  # [G, B, h, w, C]
    labels = torch.randint(0, 4, (3, 4, 4), generator=g)
    labels[0, 0, :] = IGNORE
    loss = segmentation_loss(logits, labels, IGNORE)
    for point in range(2):
        total, count = 0.0, 0
        for b in range(3):
            up = bilinear_reference(logits[point, b].permute(2, 0, 1).numpy(), (4, 4))
            for i in range(4):
                for j in range(4):
                    if labels[b, i, j] != IGNORE:
                        z = up[:, i, j]
                        total += np.log(np.exp(z - z.max()).sum()) + z.max() - z[labels[b, i, j]]
                        count += 1
        assert float(loss[point]) == pytest.approx(total / count, rel=1e-5)


def test_depth_metrics_are_per_image_means_over_valid_pixels():
    g = torch.Generator().manual_seed(3)
    gt = torch.rand(3, 5, 6, generator=g) * 8 + 0.5
    gt[0, 0, :3] = 0.0  # no depth
    gt[1, 2, 2] = 50.0  # beyond max_depth: not scored
    gt[2] = 0.0  # an image without any valid pixel does not count
    predicted = gt * (1 + 0.4 * (torch.rand(3, 5, 6, generator=g) - 0.5))
    predicted[0, 4, 5] = 20.0  # clamped to max_depth before scoring
    scores = depth_scores(depth_sums(predicted, gt, min_depth=0.001, max_depth=10.0))

    rmse, delta1, abs_rel = [], [], []
    for b in range(2):
        valid = (gt[b] > 0.001) & (gt[b] < 10.0)
        p, t = predicted[b][valid].clamp(0.001, 10.0).double().numpy(), gt[b][valid].double().numpy()
        rmse.append(np.sqrt(np.mean((p - t) ** 2)))
        delta1.append(np.mean(np.maximum(p / t, t / p) < 1.25))
        abs_rel.append(np.mean(np.abs(p - t) / t))
    assert scores.n_images == 2
    assert scores.rmse == pytest.approx(np.mean(rmse))
    assert scores.delta1 == pytest.approx(100 * np.mean(delta1))
    assert scores.abs_rel == pytest.approx(np.mean(abs_rel))
    assert 0 < scores.delta1 < 100  # the example has pixels on both sides of the threshold


def test_sig_loss_is_the_scale_invariant_log_error_over_valid_pixels():
    g = torch.Generator().manual_seed(4)
    gt = torch.rand(2, 4, 4, generator=g) * 5 + 1
    predicted = torch.rand(3, 2, 4, 4, generator=g) * 5 + 1
    valid = torch.rand(2, 4, 4, generator=g) > 0.3
    loss = sig_loss(predicted, gt, valid)
    for point in range(3):
        d = (torch.log(predicted[point] + 1e-3) - torch.log(gt + 1e-3))[valid].double()
        assert float(loss[point]) == pytest.approx(math.sqrt(d.var().item() + 0.15 * d.mean().item() ** 2), rel=1e-5)
    assert float(sig_loss((gt * 1.0)[None], gt, valid)[0]) < 1e-5  # exact depth: no loss


def test_depth_bins_weighted_by_normalised_outputs():
    outputs = torch.tensor([[-1.0, 0.5, 2.0, 0.0]])
    bins = np.linspace(1.0, 10.0, 4)
    weights = np.maximum(outputs.numpy(), 0) + 0.1  # AdaBins' "linear" normalisation
    expected = (weights / weights.sum()) @ bins
    assert float(outputs_to_depth(outputs, 1.0, 10.0)) == pytest.approx(float(expected[0]))
    softmax = np.exp(outputs.numpy()) / np.exp(outputs.numpy()).sum()
    assert float(outputs_to_depth(outputs, 1.0, 10.0, norm_strategy="softmax")) == pytest.approx(
        float((softmax @ bins)[0]), rel=1e-6)
    log_bins = np.exp(np.linspace(np.log(1.0), np.log(10.0), 4))
    assert float(outputs_to_depth(outputs, 1.0, 10.0, bins_strategy="log")) == pytest.approx(
        float(((weights / weights.sum()) @ log_bins)[0]), rel=1e-6)
    assert float(outputs_to_depth(torch.tensor([[-3.0]]), 0.5, 10.0)) == 0.5  # one bin: relu + min_depth
