"""The nominal FLOP count of the convolutional workloads (bench/flops.py), and W4's workload itself.

The counts are written out by hand here from the layer shapes, independently of the hook-based
counter: Omniglot Conv4 (28 → 14 → 7 → 4 → 2, 64 filters) and MiniImagenet Conv4 (84, pooled to
42 → 21 → 10 → 5, 32 filters)."""

import pytest
import torch

from flops import conv_meta_step_flops, image_forward_flops
from providers import miniimagenet_conv4, omniglot_conv4

OMNIGLOT_IMAGE = 2 * (14 * 14 * 64 * 9 * 1 + 7 * 7 * 64 * 9 * 64 + 4 * 4 * 64 * 9 * 64 + 2 * 2 * 64 * 9 * 64
                      + 256 * 5)
MINIIMAGENET_IMAGE = 2 * (84 * 84 * 32 * 9 * 3 + 42 * 42 * 32 * 9 * 32 + 21 * 21 * 32 * 9 * 32
                          + 10 * 10 * 32 * 9 * 32 + 800 * 5)


def count(workload):
    support_x, _, query_x, _ = workload.batch(seed=0)
    return conv_meta_step_flops(workload.make_model(), workload.image_shape, workload.tasks, support_x.shape[1],
                                query_x.shape[1], workload.steps, workload.first_order)


def test_image_forward_flops_by_hand():
    assert image_forward_flops(omniglot_conv4(1).make_model(), (1, 28, 28)) == OMNIGLOT_IMAGE
    assert image_forward_flops(miniimagenet_conv4().make_model(), (3, 84, 84)) == MINIIMAGENET_IMAGE


@pytest.mark.parametrize("workload,per_task_images", [
    # (support forward + backward + HVP) · S · 5 support images + 3 · query images, per task
    (omniglot_conv4(1), 9 * 1 * 5 + 3 * 75),
    (omniglot_conv4(5), 9 * 5 * 5 + 3 * 75),
    (omniglot_conv4(1, queries=1), 9 * 1 * 5 + 3 * 5),
    (omniglot_conv4(1, first_order=True), 3 * 1 * 5 + 3 * 75),
], ids=["W3-S1", "W3-S5", "W3-1q", "W3-first-order"])
def test_w3_count(workload, per_task_images):
    assert count(workload) == 32 * per_task_images * OMNIGLOT_IMAGE


def test_w4_count():
    assert count(miniimagenet_conv4(5)) == 4 * (9 * 5 * 5 + 3 * 75) * MINIIMAGENET_IMAGE
    assert count(miniimagenet_conv4(5, first_order=True)) == 4 * (3 * 5 * 5 + 3 * 75) * MINIIMAGENET_IMAGE


def test_w4_workload_shapes_and_model():
    workload = miniimagenet_conv4(5)
    support_x, support_y, query_x, query_y = workload.batch(seed=0)
    assert support_x.shape == (4, 5, 3, 84, 84) and query_x.shape == (4, 75, 3, 84, 84)
    assert support_y.tolist() == [list(range(5))] * 4
    assert query_y.tolist() == [[label for label in range(5) for _ in range(15)]] * 4
    assert workload.inner_lr == 0.01 and workload.loss == "cross_entropy"
    model = workload.make_model()
    assert model(support_x[0]).shape == (5, 5)
    assert sum(p.numel() for p in model.parameters()) == (
        (3 * 9 + 1) * 32 + 3 * (32 * 9 + 1) * 32 + 4 * 2 * 32 + 800 * 5 + 5)
    assert torch.equal(workload.batch(seed=0)[0], support_x)
