"""pymaml::mlp_meta_step: the whole MAML meta-step of an MLP over a batch of tasks, in one call.

Per task, with θ the flattened parameters (nn.Sequential order) and α_s = lrs[s]:
  g_s = ∇L_support(θ_s), θ_{s+1} = θ_s − α_s ⊙ g_s (s = 0..S−1);
  task loss Σ_{s=1..S} w_s L_query(θ_s) (S = 0: L_query(θ_0)).
Returns means over tasks of the loss and of its exact gradients with respect to θ, lrs and the
step weights w (first_order drops the Hessian terms), plus per-task losses. The forward
computes the gradients; the registered backward only scales them by the incoming gradient.

Schema: (theta [P], lrs [S, P], step_weights [S], support_x [T, Ks, n_0], support_y, query_x,
query_y, widths, activation, bias, loss, first_order, lr_grad, layers, layer_constants) ->
(meta_loss [], task_losses [T], pre_losses [T], step_losses [S], grad_theta [P], grad_lrs [S or 0, P]).
Targets are [T, K, n_L] floats for "mse" and [T, K] int64 labels for "cross_entropy".
The model is the MLP of widths, activation and bias when `layers` is None or empty; otherwise the
network that layers and layer_constants encode (pymaml/ops/network.py), with widths = [n_0, n_L]
and each point's input [C, H, W] flattened to n_0 values in torch's order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import grad, vmap
from torch.utils.dlpack import to_dlpack

from .._extension import extension
from .network import network_apply

ACTIVATIONS = {
    "none": lambda z: z,
    "relu": torch.relu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
}


def _mlp_apply(theta: Tensor, x: Tensor, widths: list[int], activation: str, bias: bool) -> Tensor:
    """The MLP on x [K, n_0] with parameters sliced from the flat theta."""
    offset, h = 0, x
    layers = len(widths) - 1
    for l in range(layers):
        n_in, n_out = widths[l], widths[l + 1]
        weight = theta[offset : offset + n_out * n_in].view(n_out, n_in)
        offset += n_out * n_in
        h = h @ weight.T
        if bias:
            h = h + theta[offset : offset + n_out]
            offset += n_out
        if l < layers - 1:
            h = ACTIVATIONS[activation](h)
    return h


def model_apply(theta: Tensor, x: Tensor, widths: list[int], activation: str, bias: bool, layers, layer_constants,
                step: int = 0):
    """The op's model on x [K, n_0] at inner step `step`: the MLP, or the network `layers` encodes."""
    if layers:
        return network_apply(theta, x, layers, layer_constants, step)
    return _mlp_apply(theta, x, widths, activation, bias)


def _task_loss(prediction: Tensor, target: Tensor, loss: str) -> Tensor:
    if loss == "mse":
        return (prediction - target).square().mean()
    return torch.nn.functional.cross_entropy(prediction, target)


def mlp_meta_step_torch(
    theta: Tensor, lrs: Tensor, step_weights: Tensor, support_x: Tensor, support_y: Tensor, query_x: Tensor,
    query_y: Tensor, widths: list[int], activation: str, bias: bool, loss: str, first_order: bool, lr_grad: bool,
    layers: list[int] | None = None, layer_constants: list[float] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The pure-torch twin of the fused op (torch.func vmap over tasks, autograd for the gradients)."""
    steps = lrs.shape[0]
    with torch.enable_grad():
        theta = theta.detach().requires_grad_()
        lrs = lrs.detach().requires_grad_(lr_grad)

        def loss_at(parameters, x, y, step):
            return _task_loss(model_apply(parameters, x, widths, activation, bias, layers, layer_constants, step), y,
                              loss)

        def one_task(sx, sy, qx, qy):
            current, total, step_losses = theta, 0.0, []
            for s in range(steps):
                g = grad(loss_at)(current, sx, sy, s)
                current = current - lrs[s] * (g.detach() if first_order else g)
                step_losses.append(loss_at(current, qx, qy, s + 1))
                total = total + step_weights[s] * step_losses[-1]
            pre = loss_at(theta, qx, qy, 0)
            if steps == 0:
                total = pre
            stacked = torch.stack(step_losses) if steps else pre.new_zeros(0)
            return total, pre, stacked

        task_losses, pre_losses, step_losses = vmap(one_task)(support_x, support_y, query_x, query_y)
        meta_loss = task_losses.mean()
        inputs = [theta, lrs] if lr_grad else [theta]
        grads = torch.autograd.grad(meta_loss, inputs, allow_unused=True, materialize_grads=True)
    grad_lrs = grads[1] if lr_grad else lrs.new_zeros(0, theta.shape[0])
    return (meta_loss.detach(), task_losses.detach(), pre_losses.detach(), step_losses.mean(0).detach(),
            grads[0], grad_lrs.detach())


def _fused_cpu(theta, lrs, step_weights, support_x, support_y, query_x, query_y, widths, activation, bias, loss,
               first_order, lr_grad, layers=None, layer_constants=None, all_step_losses=True, grad_out=None,
               adam=None):
    """grad_out: tensors (contiguous, θ's dtype, sizes adding up to P) for the meta-gradient to be
    written into, in place of a new grad_theta, which is then returned as None. adam: the
    binding's adam_* arguments (one buffer per grad_out tensor), to take an Adam step in place."""
    tasks, steps, params = support_x.shape[0], lrs.shape[0], theta.shape[0]
    empty = theta.new_empty
    meta_loss, task_losses, pre_losses = empty(()), empty(tasks), empty(tasks)
    step_losses, grad_lrs = empty(steps), empty(steps if lr_grad else 0, params)
    grad_theta = empty(params) if grad_out is None else None
    grad_capsules = _capsule(grad_theta) if grad_out is None else [to_dlpack(g) for g in grad_out]
    # DLPack capsules rather than the tensors: the binding then skips 12 Python calls of __dlpack__.
    extension().mlp_meta_step(
        theta=_capsule(theta), lrs=_capsule(lrs), step_weights=_capsule(step_weights),
        support_x=_capsule(support_x), support_y=_capsule(support_y), query_x=_capsule(query_x),
        query_y=_capsule(query_y), widths=widths, activation=activation, bias=bias, loss=loss,
        first_order=first_order, meta_loss=_capsule(meta_loss), task_losses=_capsule(task_losses),
        pre_losses=_capsule(pre_losses), step_losses=_capsule(step_losses), grad_theta=grad_capsules,
        grad_lrs=_capsule(grad_lrs) if lr_grad else None, threads=torch.get_num_threads(),
        all_step_losses=all_step_losses, layers=list(layers or ()), layer_constants=list(layer_constants or ()),
        **(adam or {}),
    )
    return meta_loss, task_losses, pre_losses, step_losses, grad_theta, grad_lrs


def _capsule(tensor: Tensor):
    """A DLPack capsule of the tensor's data, made contiguous (DLPack carries no autograd)."""
    return to_dlpack(tensor.contiguous())


# The CUDA launch's workspace is blocks × per-block scratch (a task's workspace, θ_0 and α padded)
# plus tasks × per-task results. Up to 4 blocks per SM and one per task run at once, as many as
# keep the whole workspace within CUDA_WORKSPACE_FRACTION of the device's memory; results do not
# depend on the number of blocks (each task is computed alone, the means are taken in task order).
CUDA_WORKSPACE_FRACTION = 0.25
CUDA_BLOCKS_PER_SM = 4


def cuda_blocks(tasks: int, multiprocessors: int, per_block_bytes: int, per_task_bytes: int, limit_bytes: int) -> int:
    """Blocks of a CUDA launch: min(tasks, CUDA_BLOCKS_PER_SM · SMs, what the workspace limit holds),
    and a ValueError naming the sizes when not even one block fits."""
    results = tasks * per_task_bytes
    fitting = (limit_bytes - results) // per_block_bytes if limit_bytes > results else 0
    if fitting < 1:
        raise ValueError(
            f"the cuda backend needs {per_block_bytes + results} bytes of workspace for even one block "
            f"({per_block_bytes} per block and {per_task_bytes} per task for {tasks} tasks), more than its limit "
            f"of {limit_bytes} bytes ({CUDA_WORKSPACE_FRACTION:g} of the device's memory); use fewer tasks, "
            "points or inner steps, narrower layers, or another backend")
    return int(min(tasks, CUDA_BLOCKS_PER_SM * multiprocessors, fitting))


_CUDA_COUNTERS: dict = {}  # per (device, stream): the completion counter of eager launches, left at zero


def _cuda_counter(device: torch.device, stream) -> Tensor:
    """The kernel's int32 completion counter for a launch on `stream`, zero and used by no other
    launch in flight. Eager launches on one stream run one after another and share one counter,
    which each launch's last block puts back to zero; a launch captured into a CUDA graph gets its
    own, zeroed inside the graph, since the graph may replay on any stream."""
    if torch.cuda.is_current_stream_capturing():
        return torch.zeros(1, dtype=torch.int32, device=device)
    key = (device.index, stream.stream_id, stream.cuda_stream)
    counter = _CUDA_COUNTERS.get(key)
    if counter is None:
        counter = _CUDA_COUNTERS[key] = torch.zeros(1, dtype=torch.int32, device=device)
    return counter


def _fused_cuda(theta, lrs, step_weights, support_x, support_y, query_x, query_y, widths, activation, bias, loss,
                first_order, lr_grad, layers=None, layer_constants=None, all_step_losses=True):
    """One launch of the CUDA kernel on theta's device and that device's current torch stream,
    whatever device is current; the workspace comes from torch's allocator. No host
    synchronisation, so that the step can be captured in a CUDA graph: cross-entropy labels are
    checked by the kernel, and one outside [0, n_L) fails a device-side assertion
    (torch._assert_async), which raises at the next synchronisation."""
    device = theta.device
    tasks, steps, params = support_x.shape[0], lrs.shape[0], theta.shape[0]
    with torch.cuda.device(device):
        stream = torch.cuda.current_stream(device)
        properties = torch.cuda.get_device_properties(device)
        per_block, per_task = extension().mlp_meta_step_cuda_workspace_parts(
            widths=list(widths), bias=bias, steps=steps, support_points=support_x.shape[1],
            query_points=query_x.shape[1], lr_grad=lr_grad, layers=list(layers or ()),
            layer_constants=list(layer_constants or ()))
        itemsize = theta.element_size()
        blocks = cuda_blocks(tasks, properties.multi_processor_count, per_block * itemsize, per_task * itemsize,
                             int(properties.total_memory * CUDA_WORKSPACE_FRACTION))
        workspace = theta.new_empty(blocks * per_block + tasks * per_task)
        counter = _cuda_counter(device, stream)
        labels_ok = torch.empty(1, dtype=torch.int32, device=device) if loss == "cross_entropy" else None
        empty = lambda *shape: theta.new_empty(shape)  # noqa: E731
        meta_loss, task_losses, pre_losses = empty(), empty(tasks), empty(tasks)
        step_losses, grad_theta, grad_lrs = empty(steps), empty(params), empty(steps if lr_grad else 0, params)
        buffer = lambda t: t.detach().contiguous()  # noqa: E731
        extension().mlp_meta_step_cuda(
            theta=buffer(theta), lrs=buffer(lrs), step_weights=buffer(step_weights), support_x=buffer(support_x),
            support_y=buffer(support_y), query_x=buffer(query_x), query_y=buffer(query_y), widths=list(widths),
            activation=activation, bias=bias, loss=loss, first_order=first_order, meta_loss=meta_loss,
            task_losses=task_losses, pre_losses=pre_losses, step_losses=step_losses, grad_theta=grad_theta,
            grad_lrs=grad_lrs if lr_grad else None, workspace=workspace, counter=counter,
            stream=stream.cuda_stream, blocks=blocks, labels_ok=labels_ok, all_step_losses=all_step_losses,
            layers=list(layers or ()), layer_constants=list(layer_constants or ()),
        )
        if labels_ok is not None:
            torch._assert_async(labels_ok, f"pymaml: support_y or query_y has labels outside [0, {widths[-1]})")
    return meta_loss, task_losses, pre_losses, step_losses, grad_theta, grad_lrs


def cuda_kernel_available() -> bool:
    """Whether the extension was built with the CUDA launcher."""
    return extension() is not None and hasattr(extension(), "mlp_meta_step_cuda")


def fused_forward(theta, lrs, step_weights, support_x, support_y, query_x, query_y, widths, activation, bias, loss,
                  first_order, lr_grad, layers=None, layer_constants=None, all_step_losses=True):
    """The op's outputs, computed by the fused kernel for the tensors' device, or by the twin
    where the extension (or its CUDA launcher) is missing. No autograd. all_step_losses=False
    lets the kernel skip the query losses of steps with weight zero (step_losses then holds NaN
    there), for callers that do not differentiate with respect to the step weights."""
    arguments = (theta, lrs, step_weights, support_x, support_y, query_x, query_y, widths, activation, bias, loss,
                 first_order, lr_grad, layers, layer_constants)
    if theta.device.type == "cpu" and extension() is not None:
        return _fused_cpu(*arguments, all_step_losses)
    if theta.device.type == "cuda" and cuda_kernel_available():
        return _fused_cuda(*arguments, all_step_losses)
    return mlp_meta_step_torch(*arguments)


def _backward_formula(lr_grad, saved, grad_meta_loss):
    if torch.is_grad_enabled():
        raise RuntimeError(
            "pymaml::mlp_meta_step computes its gradients inside the forward pass, so its backward cannot be "
            "differentiated again (create_graph=True); use backend='func' or 'reference' for higher derivatives"
        )
    grad_theta, grad_lrs, step_losses = saved
    return (grad_meta_loss * grad_theta, grad_meta_loss * grad_lrs if lr_grad else None, grad_meta_loss * step_losses)


@torch.library.custom_op("pymaml::mlp_meta_step", mutates_args=())
def mlp_meta_step_op(
    theta: Tensor, lrs: Tensor, step_weights: Tensor, support_x: Tensor, support_y: Tensor, query_x: Tensor,
    query_y: Tensor, widths: list[int], activation: str, bias: bool, loss: str, first_order: bool, lr_grad: bool,
    layers: list[int] | None = None, layer_constants: list[float] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return fused_forward(theta, lrs, step_weights, support_x, support_y, query_x, query_y, widths, activation, bias,
                         loss, first_order, lr_grad, layers, layer_constants)


def meta_step_fake(theta, lrs, step_weights, support_x, support_y, query_x, query_y, widths, activation, bias, loss,
                   first_order, lr_grad, layers=None, layer_constants=None):
    """The op's output shapes (the fake kernel of every implementation of the schema)."""
    tasks, steps, params = support_x.shape[0], lrs.shape[0], theta.shape[0]
    return (theta.new_empty(()), theta.new_empty(tasks), theta.new_empty(tasks), theta.new_empty(steps),
            theta.new_empty(params), theta.new_empty(steps if lr_grad else 0, params))


def meta_step_setup_context(ctx, inputs, output):
    _, task_losses, pre_losses, step_losses, grad_theta, grad_lrs = output
    ctx.lr_grad = inputs[12]
    ctx.save_for_backward(grad_theta, grad_lrs, step_losses)
    ctx.mark_non_differentiable(task_losses, pre_losses, step_losses, grad_theta, grad_lrs)


def meta_step_backward(ctx, grad_meta_loss, *_non_differentiable):
    return (*_backward_formula(ctx.lr_grad, ctx.saved_tensors, grad_meta_loss), *([None] * 12))


mlp_meta_step_op.register_fake(meta_step_fake)
mlp_meta_step_op.register_autograd(meta_step_backward, setup_context=meta_step_setup_context)


@dataclass(frozen=True)
class FusedImplementation:
    """One implementation of the pymaml::mlp_meta_step schema: `forward` gives the outputs without
    autograd (eager), `op` is its registered torch.library op (under torch.compile)."""

    forward: Callable
    op: Callable


NATIVE_IMPLEMENTATION = FusedImplementation(fused_forward, mlp_meta_step_op)


class _EagerMlpMetaStep(torch.autograd.Function):
    """The registered op's forward and backward without the dispatcher's Python round trips
    (bench/RESULTS.md gives their cost), used outside torch.compile. θ arrives as one or more tensors that
    are flattened and concatenated in order (a model's parameters, or one flat theta), so that
    the gradient reaches each tensor without a cat node in the graph."""

    @staticmethod
    def forward(ctx, implementation, lrs, step_weights, support_x, support_y, query_x, query_y, widths, activation,
                bias, loss, first_order, lr_grad, layers, layer_constants, all_step_losses, *theta_parts):
        theta = theta_parts[0].reshape(-1) if len(theta_parts) == 1 else torch.cat([p.reshape(-1) for p in theta_parts])
        output = implementation.forward(theta, lrs, step_weights, support_x, support_y, query_x, query_y, widths,
                                        activation, bias, loss, first_order, lr_grad, layers, layer_constants,
                                        all_step_losses=all_step_losses)
        _, task_losses, pre_losses, step_losses, grad_theta, grad_lrs = output
        ctx.lr_grad = lr_grad
        ctx.shapes = [p.shape for p in theta_parts]
        ctx.save_for_backward(grad_theta, grad_lrs, step_losses)
        ctx.mark_non_differentiable(task_losses, pre_losses, step_losses, grad_theta, grad_lrs)
        return output

    @staticmethod
    def backward(ctx, grad_meta_loss, *_non_differentiable):
        grad_theta, grad_lrs, grad_step_weights = _backward_formula(ctx.lr_grad, ctx.saved_tensors, grad_meta_loss)
        if len(ctx.shapes) == 1:
            parts = (grad_theta.view(ctx.shapes[0]),)
        else:
            parts = tuple(g.view(shape) for g, shape in
                          zip(grad_theta.split([shape.numel() for shape in ctx.shapes]), ctx.shapes))
        return (None, grad_lrs, grad_step_weights, *([None] * 13), *parts)


def mlp_meta_step(
    theta: Tensor, lrs: Tensor, step_weights: Tensor, support_x: Tensor, support_y: Tensor, query_x: Tensor,
    query_y: Tensor, widths: list[int], activation: str, bias: bool, loss: str, first_order: bool, lr_grad: bool,
    layers: list[int] | None = None, layer_constants: list[float] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """pymaml::mlp_meta_step (see the module docstring); under torch.compile the registered op."""
    return mlp_meta_step_from_parts([theta], lrs, step_weights, support_x, support_y, query_x, query_y, widths,
                                    activation, bias, loss, first_order, lr_grad, layers=layers,
                                    layer_constants=layer_constants)


def mlp_meta_step_from_parts(
    theta_parts: list[Tensor], lrs: Tensor, step_weights: Tensor, support_x: Tensor, support_y: Tensor,
    query_x: Tensor, query_y: Tensor, widths: list[int], activation: str, bias: bool, loss: str, first_order: bool,
    lr_grad: bool, all_step_losses: bool = True, implementation: FusedImplementation | None = None,
    layers: list[int] | None = None, layer_constants: list[float] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """mlp_meta_step with θ the concatenation of the flattened theta_parts (a model's parameters in
    nn.Sequential order); the gradient reaches each part. all_step_losses: see fused_forward (it
    must stay True where step_weights requires grad). implementation: the kernel (default: the
    C++ core's, NATIVE_IMPLEMENTATION)."""
    implementation = implementation or NATIVE_IMPLEMENTATION
    if torch.compiler.is_compiling():
        theta = torch.cat([p.reshape(-1) for p in theta_parts])
        return implementation.op(theta, lrs, step_weights, support_x, support_y, query_x, query_y, widths, activation,
                                 bias, loss, first_order, lr_grad, layers, layer_constants)
    return _EagerMlpMetaStep.apply(implementation, lrs, step_weights, support_x, support_y, query_x, query_y, widths,
                                   activation, bias, loss, first_order, lr_grad, layers, layer_constants,
                                   all_step_losses or step_weights.requires_grad, *theta_parts)
