"""Backend `triton`: the fused meta-step as one Triton kernel launch (pymaml.kernels), for the
MLPs the `cpp` backend takes, in float32, on CUDA tensors.

It accepts exactly the models `cpp` accepts (see pymaml.backends.cpp: no subclasses, hooks or
parametrizations, only the Linear layers' weights and biases) and re-checks them on every call
the same way; then the kernel's own limits on widths and dtype apply.

Under TRITON_INTERPRET=1 (set before pymaml.kernels is first imported) the kernel runs on CPU
tensors through Triton's interpreter; the tests use that to check it against the oracle.
`auto` never picks the interpreter.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from .base import MetaConfig
from .cpp import CppBackend, mlp_only_reason


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


class TritonBackend(CppBackend):
    name = "triton"
    checks_finite_inputs = False

    def implementation(self):
        from ..kernels.mlp_meta_step import TRITON_IMPLEMENTATION

        return TRITON_IMPLEMENTATION

    def unavailable_reason(self):
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed (pip install triton; CUDA builds of torch bring it)"
        if not interpreting() and not torch.cuda.is_available():
            return "torch sees no CUDA device (TRITON_INTERPRET=1 runs the kernel on CPU tensors, for testing)"
        return None

    def unsupported_reason(self, model, config: MetaConfig, device):
        device = torch.device(device)
        if device.type != "cuda" and not (device.type == "cpu" and interpreting()):
            return f"the Triton kernel runs on CUDA tensors, not on {device}"
        return super().unsupported_reason(model, config, torch.device("cpu"))

    def _accept(self, model):
        """cpp's acceptance, then the Triton kernel's limits on widths and dtype."""
        layout, reason = super()._accept(model)
        if reason is None and not layout.is_mlp:
            reason = mlp_only_reason(self.name)
        if reason is None:
            from ..kernels.mlp_meta_step import unsupported_reason

            reason = unsupported_reason(layout.widths, layout.parameters()[0].dtype)
        return (layout, None) if reason is None else (None, reason)

    def auto_skip_reason(self, device) -> str | None:
        if torch.device(device).type != "cuda":
            return "the Triton interpreter runs only when asked for by name"
        return None

    def meta_step(self, model, config, batch, inner_lr, step_weights):
        self._check_points(batch)
        return super().meta_step(model, config, batch, inner_lr, step_weights)

    def meta_gradient(self, model, config, batch, inner_lr, step_weights, accumulate=True):
        self._check_points(batch)
        return super().meta_gradient(model, config, batch, inner_lr, step_weights, accumulate)

    @staticmethod
    def _check_points(batch):
        from ..kernels.mlp_meta_step import MAX_PADDED_POINTS

        points = max(batch.support_x.shape[1], batch.query_x.shape[1])
        if points > MAX_PADDED_POINTS:
            raise ValueError(f"backend 'triton' takes up to {MAX_PADDED_POINTS} points per task, got {points}")


BACKEND = TritonBackend()
