"""GPU backends against the oracle, on CUDA tensors, and the CUDA launcher's host-side logic.
The GPU tests skip where there is no CUDA device; the host-side ones (the block cap of the
workspace, its error) run everywhere the extension is built."""

import copy
import os
import re
import subprocess
import sys

import pytest
import torch

import pymaml
from helpers import TOLERANCE, backends_on, make_batch, make_mlp, oracle_meta_gradient, relative_error
from pymaml._extension import extension

GPU_BACKENDS = backends_on("cuda") if torch.cuda.is_available() else []
needs_gpu = pytest.mark.skipif(not GPU_BACKENDS, reason="no CUDA device, or no GPU backend built")
needs_cuda_backend = pytest.mark.skipif("cuda" not in GPU_BACKENDS,
                                        reason="no CUDA device, or pymaml._C built without the CUDA launcher")
needs_extension = pytest.mark.skipif(extension() is None, reason="pymaml._C is not built")


def to_cuda(batch, device="cuda"):
    return tuple(t.to(device) for t in batch)


@needs_gpu
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


@needs_gpu
def test_one_kernel_launch_per_fused_meta_step():
    from pymaml.ops import encode_mlp, meta_step

    model = make_mlp((1, 40, 40, 1), "relu", torch.float32).cuda()
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    batch = to_cuda(pymaml.data.Sinusoid(0).sample(25, 10).tasks)
    lrs, weights = theta.new_full((1, theta.numel()), 0.01), theta.new_ones(1)
    arguments = (theta, lrs, weights, *batch, *encode_mlp([1, 40, 40, 1], "relu", True), "mse", False, False)
    meta_step(*arguments)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        meta_step(*arguments)
        torch.cuda.synchronize()
    kernels = [e for e in profile.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert len(kernels) == 1, [e.name for e in kernels]


@needs_cuda_backend
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_meta_train_step_captures_and_replays_in_a_cuda_graph(loss):
    """A whole training step (the fused meta-step, the label check, the optimizer) is captured
    into one CUDA graph, which needs a step without host synchronisation, and its replays on new
    batches give what eager steps give."""
    widths, dtype = (3, 16, 4), torch.float32
    model = make_mlp(widths, "tanh", dtype).cuda()
    options = dict(backend="cuda", inner_lr=0.2, inner_steps=2, loss=loss, check_inputs=False)
    maml = pymaml.MAML(model, **options)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    static = to_cuda(make_batch(6, 5, widths[0], widths[-1], loss, dtype, seed=10))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture (torch's recipe), caches constants
        for _ in range(2):
            maml.meta_train_step(*static, optimizer)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = maml.meta_train_step(*static, optimizer)
    twin = copy.deepcopy(model)
    twin_maml = pymaml.MAML(twin, **options)
    twin_optimizer = torch.optim.SGD(twin.parameters(), lr=0.05)
    for seed in (11, 12, 13):
        batch = to_cuda(make_batch(6, 5, widths[0], widths[-1], loss, dtype, seed=seed))
        for buffer, value in zip(static, batch):
            buffer.copy_(value)
        graph.replay()
        eager = twin_maml.meta_train_step(*batch, twin_optimizer)
        torch.cuda.synchronize()
        assert relative_error(captured.loss.detach().cpu(), eager.loss.detach().cpu()) <= TOLERANCE[dtype]
        for p, q in zip(model.parameters(), twin.parameters()):
            assert relative_error(p.detach().cpu(), q.detach().cpu()) <= TOLERANCE[dtype]


@needs_cuda_backend
def test_cuda_labels_out_of_range_fail_on_the_device():
    """The kernel checks the labels (no host read of device memory): a label outside [0, n_L)
    fails a device-side assertion, which a synchronisation raises (in a child process: it leaves
    the CUDA context unusable)."""
    script = """
import torch, pymaml
model = pymaml.models.mlp((3, 8, 4)).cuda()
x = torch.randn(2, 5, 3, device="cuda")
labels = torch.zeros(2, 5, dtype=torch.long, device="cuda")
labels[1, 3] = 4
maml = pymaml.MAML(model, backend="cuda", loss="cross_entropy", inner_steps=1, check_inputs=False)
maml.meta_gradient(x, labels, x, torch.zeros_like(labels))
torch.cuda.synchronize()
print("no error")
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "no error" not in run.stdout, run.stdout + run.stderr
    assert "device-side assert" in run.stderr, run.stderr[-3000:]


@needs_cuda_backend
def test_launches_on_two_streams_in_flight_match_one_stream():
    """Each stream's launches have their own completion counter, so two meta-steps in flight on
    two streams give what they give one after another."""
    from pymaml.ops.meta_step.cuda import cuda_counter

    first, second = torch.cuda.Stream(), torch.cuda.Stream()
    device = torch.device("cuda", torch.cuda.current_device())
    assert cuda_counter(device, first).data_ptr() != cuda_counter(device, second).data_ptr()
    widths, dtype = (2, 32, 32, 1), torch.float64
    models = [make_mlp(widths, "relu", dtype, seed=s).cuda() for s in (0, 1)]
    batches = [to_cuda(make_batch(64, 10, 2, 1, "mse", dtype, seed=s)) for s in (3, 4)]
    expected = [pymaml.MAML(m, backend="cuda", inner_steps=2).meta_gradient(*b).loss.cpu()
                for m, b in zip(models, batches)]
    torch.cuda.synchronize()
    for stream in (first, second):
        stream.wait_stream(torch.cuda.current_stream())
    results = [[], []]
    for _ in range(5):
        for i, stream in enumerate((first, second)):
            with torch.cuda.stream(stream):
                results[i].append(pymaml.MAML(models[i], backend="cuda", inner_steps=2).meta_gradient(
                    *batches[i], accumulate=False).loss)
    torch.cuda.synchronize()
    for i in range(2):
        for loss in results[i]:
            assert relative_error(loss.cpu(), expected[i]) <= TOLERANCE[dtype]


@pytest.mark.skipif(torch.cuda.device_count() < 2 or "cuda" not in GPU_BACKENDS, reason="needs two CUDA devices")
def test_launch_runs_on_the_tensors_device_and_keeps_the_current_one():
    widths, dtype = (3, 7, 2), torch.float64
    model = make_mlp(widths, "tanh", dtype)
    batch = make_batch(5, 4, 3, 2, "mse", dtype)
    expected_loss, _ = oracle_meta_gradient(model, batch, inner_lr=0.3, inner_steps=1, first_order=False, loss="mse")
    with torch.cuda.device(0):
        out = pymaml.MAML(make_mlp(widths, "tanh", dtype).to("cuda:1"), backend="cuda", inner_lr=0.3)(
            *to_cuda(batch, "cuda:1"))
        assert torch.cuda.current_device() == 0
    assert relative_error(out.loss.detach().cpu(), expected_loss) <= TOLERANCE[dtype]


# The launcher's block cap, on the host: the workspace's sizes come from the extension's layout.
H100 = dict(multiprocessors=132, memory=80 * 2**30)


def _cuda_blocks(widths, tasks, steps, points, dtype_bytes, device=H100, lr_grad=False):
    from pymaml.ops import encode_mlp
    from pymaml.ops.meta_step.cuda import CUDA_WORKSPACE_FRACTION, cuda_blocks

    layers, constants = encode_mlp(widths, "relu", True)
    per_block, per_task = extension().meta_step_cuda_workspace_parts(
        layers=layers, layer_constants=constants, steps=steps, support_points=points, query_points=points,
        lr_grad=lr_grad)
    limit = int(device["memory"] * CUDA_WORKSPACE_FRACTION)
    blocks = cuda_blocks(tasks, device["multiprocessors"], per_block * dtype_bytes, per_task * dtype_bytes, limit)
    total = extension().meta_step_cuda_workspace(
        layers=layers, layer_constants=constants, tasks=tasks, steps=steps, support_points=points,
        query_points=points, lr_grad=lr_grad, blocks=blocks)
    assert total == blocks * per_block + tasks * per_task
    return blocks, total * dtype_bytes, limit, per_block * dtype_bytes


@needs_extension
def test_cuda_blocks_are_capped_by_the_workspace_limit():
    # A wide MLP at S = 5 in float64, 128 points: 4 blocks per SM and 16384 tasks' results would
    # take more than a quarter of an 80 GB device.
    widths, tasks = (128, 128, 128, 128, 128), 16384
    blocks, total, limit, per_block = _cuda_blocks(widths, tasks, 5, 128, 8)
    per_task_bytes = (total - blocks * per_block) // tasks
    assert 4 * 132 * per_block + tasks * per_task_bytes > limit  # the old min(T, 4·SMs) blocks would not fit
    assert 1 <= blocks < 4 * 132 and total <= limit
    assert total + per_block > limit  # as many blocks as fit
    # The sinusoid MLP: one block per task up to 4 per SM, far below the limit.
    assert _cuda_blocks((1, 40, 40, 1), 25, 1, 10, 4)[0] == 25
    assert _cuda_blocks((1, 40, 40, 1), 16384, 1, 10, 4)[0] == 4 * 132


@needs_extension
def test_cuda_workspace_that_cannot_hold_one_block_raises():
    small = dict(multiprocessors=8, memory=64 * 2**20)
    with pytest.raises(ValueError, match=r"needs \d+ bytes of workspace for even one block .* limit of 16777216 bytes"):
        _cuda_blocks((128, 128, 128, 128, 128), 4, 5, 64, 8, device=small)
    # Per-task results alone beyond the limit are the same error.
    with pytest.raises(ValueError, match="for even one block"):
        _cuda_blocks((1, 40, 40, 1), 10**6, 1, 10, 8, device=small)


@needs_extension
def test_kernel_launch_bounds_are_the_block_size_it_is_launched_with():
    """Every cubin of the meta-step kernel carries __launch_bounds__ of the binding's block size
    (so that ptxas sizes its registers for it), and that block size's registers fit an SM."""
    from test_build import _cuobjdump

    info = pymaml.build_info()
    if os.environ.get("PYMAML_REQUIRE_CUDA_BUILD") != "1" and not info["cuda_archs"]:
        pytest.skip("built without CUDA (no nvcc on PATH, or PYMAML_CUDA=0)")
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (install the CUDA toolkit's, or triton, which ships one)")
    # The block size the binding launches with by default (its docstring's signature).
    block = int(re.search(r"threads_per_block: [^=]*= (\d+)", extension().meta_step_cuda.__doc__).group(1))
    elf = subprocess.run([tool, "-elf", extension().__file__], capture_output=True, text=True, check=True).stdout
    bounds = re.findall(r"EIATTR_MAX_THREADS\s+Format:\s+\S+\s+Value:\s+(0x[0-9a-f]+) 0x1 0x1", elf)
    registers = [int(r) for r in re.findall(r"meta_step_kernel\S*\s+register count: (\d+)", elf)]
    kernels = 2 * len(info["cuda_archs"])  # float32 and float64 per arch
    assert [int(b, 16) for b in bounds] == [block] * kernels, bounds
    assert len(registers) == kernels and all(r * block <= 65536 for r in registers), registers
