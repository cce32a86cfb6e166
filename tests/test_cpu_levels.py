"""Every ISA level of the CPU kernels this build has and this CPU runs (x86-64-v4, x86-64-v3,
baseline) gives the oracle's meta-gradient; the level is chosen from the running CPU."""

import platform

import pytest
import torch

import pymaml
from helpers import TOLERANCE, make_batch, make_mlp, oracle_meta_gradient, relative_error
from pymaml._extension import extension
from pymaml.ops import encode_mlp, hvp

needs_extension = pytest.mark.skipif(pymaml.build_info()["extension"] is False, reason="pymaml._C is not built")
LEVELS = pymaml.build_info().get("cpu_levels", [])


@pytest.fixture
def cpu_level(request):
    """Runs the test on the named level, then restores the best one."""
    extension().set_cpu_level(request.param)
    yield request.param
    extension().set_cpu_level(LEVELS[0])


@needs_extension
def test_best_level_is_chosen_and_baseline_is_built():
    info = pymaml.build_info()
    assert info["cpu_level"] == LEVELS[0]
    assert LEVELS[-1] == "baseline"
    if platform.machine() in ("x86_64", "AMD64") and info["compiler"].startswith("gcc"):
        assert set(LEVELS) <= {"x86-64-v4", "x86-64-v3", "baseline"}
        with open("/proc/cpuinfo") as cpuinfo:
            flags = cpuinfo.read()
        if " avx2 " in flags and " fma " in flags:
            assert "x86-64-v3" in LEVELS, "an AVX2 CPU must get the x86-64-v3 kernels"
        if " avx512f " in flags and " avx512bw " in flags and " avx512vl " in flags and " avx512dq " in flags:
            assert LEVELS[0] == "x86-64-v4", "an AVX-512 CPU must get the x86-64-v4 kernels"


@needs_extension
def test_unknown_level_names_the_levels():
    with pytest.raises(ValueError, match="'x86-64-v9' is not one this build has .*baseline"):
        extension().set_cpu_level("x86-64-v9")
    assert pymaml.build_info()["cpu_level"] == LEVELS[0]


CASES = [  # widths, activation, loss, steps, shots (odd widths and point counts cross every tile edge)
    ((1, 40, 40, 1), "relu", "mse", 3, 10),
    ((5, 33, 17, 3), "tanh", "cross_entropy", 2, 7),
    ((2, 64, 1), "relu", "mse", 1, 19),
    ((9, 8, 24, 50, 4), "tanh", "mse", 2, 13),
]


@needs_extension
@pytest.mark.parametrize("cpu_level", LEVELS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", CASES, ids=lambda case: "-".join(map(str, case[0])))
def test_level_matches_oracle(cpu_level, dtype, case):
    widths, activation, loss, steps, shots = case
    model = make_mlp(widths, activation, dtype)
    batch = make_batch(3, shots, widths[0], widths[-1], loss, dtype, queries=shots + 2)
    options = dict(inner_lr=0.05, inner_steps=steps, loss=loss)
    expected_loss, expected_grad = oracle_meta_gradient(model, batch, **options)
    out = pymaml.MAML(model, backend="cpp", **options)(*batch)
    grad = torch.autograd.grad(out.loss, list(model.parameters()))
    assert relative_error(out.loss.detach(), expected_loss) <= TOLERANCE[dtype]
    assert relative_error(torch.cat([g.reshape(-1) for g in grad]), expected_grad) <= TOLERANCE[dtype]


@needs_extension
@pytest.mark.parametrize("cpu_level", LEVELS, indirect=True)
def test_level_hvp_matches_autograd(cpu_level):
    widths = (3, 33, 18, 2)
    model = make_mlp(widths, "tanh", torch.float64)
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    tasks, points = 2, 11
    thetas = theta.expand(tasks, -1).contiguous()
    generator = torch.Generator().manual_seed(3)
    v = torch.randn(tasks, theta.numel(), generator=generator, dtype=torch.float64)
    x, y, _, _ = make_batch(tasks, points, widths[0], widths[-1], "mse", torch.float64)
    hv = hvp(thetas, v, x, y, *encode_mlp(widths, "tanh", True), "mse")
    for t in range(tasks):
        def loss_at(flat):
            params, offset = {}, 0
            for name, p in model.named_parameters():
                params[name] = flat[offset: offset + p.numel()].view_as(p)
                offset += p.numel()
            return torch.nn.functional.mse_loss(torch.func.functional_call(model, params, (x[t],)), y[t])

        expected = torch.autograd.functional.hvp(loss_at, theta, v[t])[1]
        assert relative_error(hv[t], expected) <= TOLERANCE[torch.float64]
