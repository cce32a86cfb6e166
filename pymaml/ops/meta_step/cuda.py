"""pymaml::meta_step on CUDA tensors: one launch of the CUDA kernel (csrc/cuda/meta_step_cuda.cu)
on the tensors' device and that device's current torch stream."""

from __future__ import annotations

import torch
from torch import Tensor

from ..._extension import extension
from .network import output_features

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


def cuda_counter(device: torch.device, stream) -> Tensor:
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


def cuda_kernel_available() -> bool:
    """Whether the extension was built with the CUDA launcher."""
    return extension() is not None and hasattr(extension(), "meta_step_cuda")


def fused_cuda(theta, lrs, step_weights, support_x, support_y, query_x, query_y, layers, layer_constants, loss,
               first_order, lr_grad, all_step_losses=True):
    """One launch of the CUDA kernel on theta's device and that device's current torch stream,
    whatever device is current; the workspace comes from torch's allocator. No host
    synchronisation, so that the step can be captured in a CUDA graph: cross-entropy labels are
    checked by the kernel, and one outside [0, classes) fails a device-side assertion
    (torch._assert_async), which raises at the next synchronisation."""
    device = theta.device
    tasks, steps, params = support_x.shape[0], lrs.shape[0], theta.shape[0]
    layers, layer_constants = list(layers), list(layer_constants)
    with torch.cuda.device(device):
        stream = torch.cuda.current_stream(device)
        properties = torch.cuda.get_device_properties(device)
        per_block, per_task = extension().meta_step_cuda_workspace_parts(
            layers=layers, layer_constants=layer_constants, steps=steps, support_points=support_x.shape[1],
            query_points=query_x.shape[1], lr_grad=lr_grad)
        itemsize = theta.element_size()
        blocks = cuda_blocks(tasks, properties.multi_processor_count, per_block * itemsize, per_task * itemsize,
                             int(properties.total_memory * CUDA_WORKSPACE_FRACTION))
        workspace = theta.new_empty(blocks * per_block + tasks * per_task)
        counter = cuda_counter(device, stream)
        labels_ok = torch.empty(1, dtype=torch.int32, device=device) if loss == "cross_entropy" else None
        empty = lambda *shape: theta.new_empty(shape)  # noqa: E731
        meta_loss, task_losses, pre_losses = empty(), empty(tasks), empty(tasks)
        step_losses, grad_theta, grad_lrs = empty(steps), empty(params), empty(steps if lr_grad else 0, params)
        buffer = lambda t: t.detach().contiguous()  # noqa: E731
        extension().meta_step_cuda(
            theta=buffer(theta), lrs=buffer(lrs), step_weights=buffer(step_weights), support_x=buffer(support_x),
            support_y=buffer(support_y), query_x=buffer(query_x), query_y=buffer(query_y), layers=layers,
            layer_constants=layer_constants, loss=loss, first_order=first_order, meta_loss=meta_loss,
            task_losses=task_losses, pre_losses=pre_losses, step_losses=step_losses, grad_theta=grad_theta,
            grad_lrs=grad_lrs if lr_grad else None, workspace=workspace, counter=counter,
            stream=stream.cuda_stream, blocks=blocks, labels_ok=labels_ok, all_step_losses=all_step_losses,
        )
        if labels_ok is not None:
            classes = output_features(layers, layer_constants)
            torch._assert_async(labels_ok, f"pymaml: support_y or query_y has labels outside [0, {classes})")
    return meta_loss, task_losses, pre_losses, step_losses, grad_theta, grad_lrs
