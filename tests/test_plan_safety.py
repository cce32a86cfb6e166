"""The cpp backend's held plan against tensors changed in place between calls: a .grad, a
parameter or an Adam buffer given new storage (.data =, set_, share_memory) or new strides keeps
its Python identity, so the plan must see the change in the tensors themselves and never write
through the pointers it was built with. Every case compares the planned model, gradients and
optimizer state with the same steps on backend `func` and torch.optim.Adam, and runs in a
forked child process, so that a write into freed memory fails the case instead of killing
pytest (.ci/sanitize.sh runs this file under AddressSanitizer)."""

import os

import pytest
import torch

import pymaml
from helpers import TOLERANCE, make_batch, make_mlp, relative_error
from pymaml._extension import extension

pytestmark = pytest.mark.skipif(extension() is None, reason="the compiled extension is not built")

WIDTHS = (3, 6, 6, 2)  # layer 2 is a square Linear, so a transpose keeps its shape
BATCHES = [make_batch(4, 5, 3, 2, "mse", seed=seed) for seed in range(3)]


def _square(model):
    return model[2].weight


def _each_state(optimizer, key):
    return [state[key] for state in optimizer.state.values()]


def _assign_data(tensors, make):
    for t in tensors:
        t.data = make(t)


# Each mutation takes the MAML and its optimizer; "grad" marks those that also apply to
# meta_gradient without an optimizer.
MUTATIONS = {
    "grad_data": (True, lambda maml, opt: _assign_data([p.grad for p in maml.module.parameters()], torch.zeros_like)),
    "grad_set": (True, lambda maml, opt: [p.grad.set_(torch.zeros_like(p)) for p in maml.module.parameters()]),
    "grad_other_shape": (True, lambda maml, opt: _assign_data([p.grad for p in maml.module.parameters()],
                                                               lambda g: torch.zeros(2 * g.numel(), dtype=g.dtype))),
    "grad_transposed": (True, lambda maml, opt: _assign_data([_square(maml.module).grad], lambda g: g.t())),
    "param_data": (True, lambda maml, opt: _assign_data(list(maml.module.parameters()), lambda p: p.clone())),
    "param_transposed": (True, lambda maml, opt: _assign_data([_square(maml.module)], lambda p: p.t())),
    "share_memory": (True, lambda maml, opt: maml.module.share_memory()),
    "exp_avg_data": (False, lambda maml, opt: _assign_data(_each_state(opt, "exp_avg"), torch.clone)),
    "exp_avg_sq_set": (False, lambda maml, opt: [v.set_(v.clone()) for v in _each_state(opt, "exp_avg_sq")]),
    "exp_avg_transposed": (False, lambda maml, opt: _assign_data([opt.state[_square(maml.module)]["exp_avg"]],
                                                                  lambda m: m.t())),
    "step_data": (False, lambda maml, opt: _assign_data(_each_state(opt, "step"), torch.clone)),
}


def _twins():
    """The same model and Adam twice: through the cpp backend's plan and through `func`."""
    out = []
    for backend in ("cpp", "func"):
        maml = pymaml.MAML(make_mlp(WIDTHS, "tanh"), inner_lr=0.2, inner_steps=2, backend=backend)
        out.append((maml, torch.optim.Adam(maml.parameters(), lr=1e-2)))
    return out


def _step(maml, optimizer, batch):
    if optimizer is None:
        return maml.meta_gradient(*batch, accumulate=False)
    if maml.backend == "cpp":
        return maml.meta_train_step(*batch, optimizer)
    out = maml.meta_gradient(*batch, accumulate=False)
    optimizer.step()
    return out


def _differences(planned, general, with_optimizer):
    """What differs between the two twins beyond float64 tolerance."""
    tolerance, found = TOLERANCE[torch.float64], []
    pairs = zip(planned[0].module.named_parameters(), general[0].module.parameters())
    for (name, actual), expected in pairs:
        if relative_error(actual, expected) > tolerance:
            found.append(f"parameter {name}")
        if actual.grad.shape != expected.grad.shape or relative_error(actual.grad, expected.grad) > tolerance:
            found.append(f"gradient of {name}")
        if with_optimizer:
            state, expected_state = planned[1].state[actual], general[1].state[expected]
            for key in ("exp_avg", "exp_avg_sq", "step"):
                if relative_error(torch.as_tensor(state[key]), torch.as_tensor(expected_state[key])) > tolerance:
                    found.append(f"{key} of {name}")
    return found


def run_case(name: str, with_optimizer: bool) -> list[str]:
    """One planned call, the mutation on both twins, two more calls; the differences found."""
    planned, general = _twins()
    if not with_optimizer:
        planned, general = (planned[0], None), (general[0], None)
    mutate = MUTATIONS[name][1]
    for index, batch in enumerate(BATCHES):
        if index == 1:
            for maml, optimizer in (planned, general):
                mutate(maml, optimizer)
        outputs = [_step(*twin, batch) for twin in (planned, general)]
        if relative_error(outputs[0].loss, outputs[1].loss) > TOLERANCE[torch.float64]:
            return [f"loss of call {index}"]
    return _differences(planned, general, with_optimizer)


CASES = [(name, True) for name in MUTATIONS] + [(name, False) for name, (grad, _) in MUTATIONS.items() if grad]


def _in_child(function, *args) -> tuple[int, str]:
    """function(*args) in a forked child: its wait status and what it returned (or raised)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        code = 0
        try:
            torch.set_num_threads(1)
            message = repr(function(*args))
        except BaseException as error:  # reported to the parent, which fails the test
            message, code = f"{type(error).__name__}: {error}", 2
        os.write(write, message.encode())
        os._exit(code)
    os.close(write)
    with os.fdopen(read) as stream:
        message = stream.read()
    return os.waitpid(pid, 0)[1], message


@pytest.mark.parametrize("name,with_optimizer", CASES,
                         ids=[f"{name}-{'adam' if adam else 'meta_gradient'}" for name, adam in CASES])
def test_plan_sees_tensors_changed_in_place(name, with_optimizer):
    status, message = _in_child(run_case, name, with_optimizer)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"child ended with status {status}: {message}"
    assert message == "[]", f"differs from func + torch.optim.Adam: {message}"
