"""GPU backends against the oracle, on CUDA tensors. Skipped where there is no CUDA device."""

import pytest
import torch

import pymaml
from helpers import TOLERANCE, backends_on, make_batch, make_mlp, oracle_meta_gradient, relative_error

GPU_BACKENDS = backends_on("cuda") if torch.cuda.is_available() else []
pytestmark = pytest.mark.skipif(not GPU_BACKENDS, reason="no CUDA device, or no GPU backend built")


def to_cuda(batch):
    return tuple(t.cuda() for t in batch)


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@pytest.mark.parametrize("steps", [0, 1, 3])
@pytest.mark.parametrize("widths", [(3, 2), (3, 7, 2), (3, 40, 17, 2)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_gpu_backends_match_oracle(widths, steps, loss, first_order, dtype):
    model = make_mlp(widths, "tanh", dtype)
    batch = make_batch(7, 5, widths[0], widths[-1], loss, dtype)
    options = dict(inner_lr=0.3, inner_steps=steps, first_order=first_order, loss=loss)
    expected_loss, expected_grad = oracle_meta_gradient(model, batch, **options)
    gpu_model = make_mlp(widths, "tanh", dtype).cuda()
    for backend in GPU_BACKENDS:
        out = pymaml.MAML(gpu_model, backend=backend, **options)(*to_cuda(batch))
        grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(out.loss, list(gpu_model.parameters()))])
        assert relative_error(out.loss.detach().cpu(), expected_loss) <= TOLERANCE[dtype], backend
        assert relative_error(grad.cpu(), expected_grad) <= TOLERANCE[dtype], backend


def test_one_kernel_launch_per_fused_meta_step():
    from pymaml.ops import mlp_meta_step

    model = make_mlp((1, 40, 40, 1), "relu", torch.float32).cuda()
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    batch = to_cuda(pymaml.data.Sinusoid(0).sample(25, 10).tasks)
    lrs, weights = theta.new_full((1, theta.numel()), 0.01), theta.new_ones(1)
    arguments = (theta, lrs, weights, *batch, [1, 40, 40, 1], "relu", True, "mse", False, False)
    mlp_meta_step(*arguments)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        mlp_meta_step(*arguments)
        torch.cuda.synchronize()
    kernels = [e for e in profile.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert len(kernels) == 1, [e.name for e in kernels]
