"""The fused meta-step's task workspace is sized by each pass's own points: S support passes of the
support points and one query pass of the query points (csrc/core/network_task.h). Sizing all S + 1
passes by the larger set made a task with 2 support and 2000 query points at S = 20 hold 21 query
passes (about 360 MB per thread for the MLP below, against about 40 MB now)."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import pymaml
from helpers import assert_backend_matches_oracle

pytestmark = pytest.mark.skipif(not pymaml.build_info()["extension"], reason="the compiled core is not built")

# One process: set-up (imports, the model, a warm-up call on a small batch), then the peak resident
# set's growth over one meta-step with few support and many query points.
CHILD = textwrap.dedent(
    """
    import json, torch, pymaml
    from torch import nn

    def peak_mb():
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 2))
    maml = pymaml.MAML(model, inner_lr=0.01, inner_steps=20, backend="cpp")
    def batch(query):
        g = torch.Generator().manual_seed(1)
        return (torch.randn(1, 2, 3, generator=g), torch.randn(1, 2, 2, generator=g),
                torch.randn(1, query, 3, generator=g), torch.randn(1, query, 2, generator=g))
    maml.meta_gradient(*batch(2), accumulate=False)
    data = batch(2000)
    before = peak_mb()
    out = maml.meta_gradient(*data, accumulate=False)
    after = peak_mb()
    assert torch.isfinite(out.loss)
    print(json.dumps({"growth_mb": after - before, "backend": out.backend}))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is read from /proc/self/status (Linux)")
def test_many_query_points_do_not_multiply_the_workspace_by_the_steps(tmp_path):
    # Run outside the checkout: `python -c` puts the working directory first on sys.path, where the
    # source tree's pymaml (without the built extension of a non-editable install) would shadow it.
    run = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["backend"] == "cpp"
    # The S = 20 support passes hold 2 points each; one query pass holds 2000 points of 514 padded
    # units (values and gradients, float32): about 8 MB, plus the 21 θ_s and their transposes
    # (about 10 MB). Sizing each support pass by the query points adds about 320 MB.
    assert result["growth_mb"] < 120, result


@pytest.mark.parametrize("support, query", [(9, 2), (2, 9), (7, 7), (1, 12)])
@pytest.mark.parametrize("steps", [1, 3])
def test_unequal_support_and_query_points_match_the_oracle(support, query, steps):
    torch.manual_seed(support * 31 + query)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3, padding=1), torch.nn.BatchNorm2d(3, track_running_stats=False),
                                torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Flatten(),
                                torch.nn.Linear(3 * 3 * 3, 4)).double()
    g = torch.Generator().manual_seed(5)
    batch = (torch.randn(3, support, 1, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 4, (3, support), generator=g),
             torch.randn(3, query, 1, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 4, (3, query), generator=g))
    assert_backend_matches_oracle(model, batch, "cpp", inner_lr=0.3, inner_steps=steps, loss="cross_entropy")
