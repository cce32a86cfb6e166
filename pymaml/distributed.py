"""Meta-batches split across processes: each rank computes the meta-gradient of its share of
the tasks and an all-reduce makes every rank hold the meta-gradient of the whole meta-batch.

    context = pymaml.distributed.init()               # from torchrun's environment; gloo on CPU, nccl on CUDA
    trainer = pymaml.distributed.DistributedMAML(maml, context)   # broadcasts rank 0's weights
    optimizer = torch.optim.Adam(maml.parameters(), lr=1e-3)
    for batch in batches:                             # the same global batch [T, ...] on every rank
        out = trainer.meta_train_step(*context.shard(batch), optimizer)

The meta-loss is a mean over tasks, L = (1/T) Σ_t L_t, so with n_r tasks on rank r,
∇L = Σ_r (n_r/T) ∇L^(r), where L^(r) is the mean over rank r's tasks: each rank scales its
meta-gradient (and its logged losses) by n_r and one all-reduce sums them with the counts, so
unequal shards (T not divisible by the world size) give the exact mean. Identical gradients on
every rank keep the weights identical after optimizer.step().

Launched without torchrun, init() returns a single-process context whose shard is the whole
batch and whose meta_gradient is the model's own, so the same script runs either way.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .algorithms.maml import MAML
from .backends import MetaOutput

# The variables torchrun (torch.distributed.run) sets in every worker's environment.
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _not_initialized_error() -> RuntimeError:
    return RuntimeError(
        "torch.distributed is not initialized; call pymaml.distributed.init() in every process "
        "(launched by torchrun) first, or pass the single-process context it returns without torchrun"
    )


def shard_range(num_tasks: int, rank: int, world_size: int) -> range:
    """The tasks of rank `rank`: contiguous, the first T mod W ranks one task more than the others."""
    for name, value in (("num_tasks", num_tasks), ("rank", rank), ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an integer, got {value!r}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    if num_tasks < world_size:
        raise ValueError(
            f"the meta-batch has {num_tasks} tasks but there are {world_size} ranks; every rank needs at least one task"
        )
    base, extra = divmod(num_tasks, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def _num_tasks(batch) -> int:
    """The common leading (task) dimension of a tensor or of a tuple of tensors."""
    tensors = [batch] if isinstance(batch, torch.Tensor) else list(batch)
    if not tensors:
        raise ValueError("the batch is empty; expected tensors with a leading task dimension T")
    counts = []
    for position, tensor in enumerate(tensors):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"batch element {position} is a {type(tensor).__name__}, not a torch.Tensor")
        if tensor.dim() == 0:
            raise ValueError(f"batch element {position} is a scalar; every tensor needs a leading task dimension T")
        counts.append(tensor.shape[0])
    if len(set(counts)) != 1:
        raise ValueError(f"the task dimension (dim 0) differs between the batch's tensors: {counts}")
    return counts[0]


def shard(batch, rank: int, world_size: int):
    """Rank `rank`'s slice of a meta-batch: a tensor [T, ...], or a tuple (NamedTuple included)
    of tensors sharing the leading task dimension T, sliced along it (views, no copies)."""
    tasks = shard_range(_num_tasks(batch), rank, world_size)
    part = slice(tasks.start, tasks.stop)
    if isinstance(batch, torch.Tensor):
        return batch[part]
    sliced = [tensor[part] for tensor in batch]
    if hasattr(batch, "_fields"):
        return type(batch)(*sliced)
    return type(batch)(sliced) if isinstance(batch, list) else tuple(sliced)


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands: its rank among world_size processes, the process group's
    backend (None in a single process), and the device its tensors live on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_process_group: bool = False

    @property
    def is_distributed(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs, evaluates and writes files."""
        return self.rank == 0

    def shard_range(self, num_tasks: int) -> range:
        return shard_range(num_tasks, self.rank, self.world_size)

    def shard(self, batch):
        """This rank's slice of the meta-batch (see pymaml.distributed.shard)."""
        return shard(batch, self.rank, self.world_size)

    def require_process_group(self) -> None:
        if self.is_distributed and not torch.distributed.is_initialized():
            raise _not_initialized_error()

    def broadcast_object(self, value, source: int = 0):
        """rank `source`'s picklable value, on every rank."""
        if not self.is_distributed:
            return value
        self.require_process_group()
        holder = [value if self.rank == source else None]
        torch.distributed.broadcast_object_list(holder, src=source)
        return holder[0]

    def check_same(self, what: str, value) -> None:
        """Raises on every rank when the ranks hold different values of a picklable `value`."""
        if not self.is_distributed:
            return
        self.require_process_group()
        values = [None] * self.world_size
        torch.distributed.all_gather_object(values, value)
        if any(other != values[0] for other in values):
            listing = "; ".join(f"rank {rank}: {other!r}" for rank, other in enumerate(values))
            raise ValueError(f"the ranks disagree on {what}: {listing}")

    def close(self) -> None:
        """Destroys the process group if init() created it."""
        if self.owns_process_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    def __enter__(self) -> DistributedContext:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def load_on_main(path, load, context: DistributedContext):
    """`load(path)` on rank 0 when the file exists, its result sent to every rank (None where there
    is no file), so the other ranks need neither the file nor a shared file system. An error of
    `load` on rank 0 is raised on every rank (a ValueError, a refused checkpoint, as a ValueError;
    any other, a damaged file say, as a RuntimeError), never leaving the others waiting."""
    state, error, refused = None, None, False
    if context.is_main and path is not None and Path(path).exists():
        try:
            state = load(path)
        except Exception as failure:  # every rank must reach the broadcast below
            if not context.is_distributed:
                raise
            refused = isinstance(failure, ValueError)
            error = str(failure) if refused else f"{type(failure).__name__}: {failure}"
    state, error, refused = context.broadcast_object((state, error, refused))
    if error is not None:
        raise ValueError(error) if refused else RuntimeError(error)
    return state


def launched() -> bool:
    """Whether this process was started by torchrun (its environment names a rank and a world size)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _default_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def current() -> DistributedContext:
    """The context of the already initialized default process group."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise _not_initialized_error()
    backend = str(torch.distributed.get_backend())
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if backend == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    return DistributedContext(torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank,
                              backend, device, owns_process_group=False)


def init(backend: str | None = None, device=None, timeout: datetime.timedelta | None = None) -> DistributedContext:
    """Initializes torch.distributed from torchrun's environment variables and returns this
    process's context; without torchrun, a single-process context (nothing is initialized).

    device: where the model lives; None picks CUDA when available (cuda:LOCAL_RANK, made the
    current device), else the CPU. backend: None picks nccl for CUDA and gloo for the CPU.
    If the default process group already exists it is used as it is.
    """
    if backend is not None and backend not in ("gloo", "nccl", "mpi", "ucc"):
        raise ValueError(f"unknown torch.distributed backend {backend!r}; use 'gloo' (CPU) or 'nccl' (CUDA)")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        context = current()
        if backend is not None and backend != context.backend:
            raise ValueError(f"torch.distributed is already initialized with {context.backend!r}, not {backend!r}")
        return context
    device = _default_device(device)
    if not launched():
        return DistributedContext(device=device)
    missing = [name for name in LAUNCH_VARIABLES if name not in os.environ]
    if missing:
        raise RuntimeError(f"the launch environment lacks {', '.join(missing)}; start the processes with torchrun")
    if not torch.distributed.is_available():
        raise RuntimeError("this torch build has no torch.distributed")
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK is {local_rank} but this machine has {torch.cuda.device_count()} CUDA devices; "
                               "start at most one process per GPU")
        device = torch.device("cuda", local_rank if device.index is None else device.index)
        torch.cuda.set_device(device)
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    if backend == "nccl" and device.type != "cuda":
        raise ValueError(f"nccl needs CUDA tensors but the device is {device}; use backend='gloo' on the CPU")
    available = {"gloo": torch.distributed.is_gloo_available, "nccl": torch.distributed.is_nccl_available,
                 "mpi": torch.distributed.is_mpi_available, "ucc": torch.distributed.is_ucc_available}[backend]
    if not available():
        raise RuntimeError(f"this torch build has no {backend} backend")
    options = {} if timeout is None else {"timeout": timeout}
    if backend == "nccl":
        options["device_id"] = device
    torch.distributed.init_process_group(backend=backend, rank=rank, world_size=world_size, **options)
    return DistributedContext(rank, world_size, local_rank, backend, device, owns_process_group=True)


@dataclass
class DistributedMetaOutput(MetaOutput):
    """A MetaOutput whose loss and pre_adaptation_loss are means over all num_tasks tasks of the
    meta-batch (every rank holds the same values); task_losses are this rank's tasks only."""

    num_tasks: int
    world_size: int


def _trained_parameters(maml: MAML) -> list[nn.Parameter]:
    """The model's parameters and learned step sizes that get meta-gradients."""
    return [p for p in maml.parameters() if p.requires_grad]


def _context_or_current(context: DistributedContext | None) -> DistributedContext:
    return current() if context is None else context


def meta_gradient(maml: MAML, support_x, support_y, query_x, query_y, *,
                  context: DistributedContext | None = None, accumulate: bool = True) -> DistributedMetaOutput:
    """maml.meta_gradient over this rank's tasks, then one all-reduce: afterwards every rank's
    .grad (model parameters and learned step sizes) holds the meta-gradient of the mean over
    the tasks of all ranks, and the returned losses are those means too.

    The inputs are this rank's shard [n_r, ...] (context.shard(global_batch)); ranks may hold
    different task counts. accumulate=False replaces .grad, accumulate=True adds to it (the
    all-reduce covers only the new meta-gradient). context None: the initialized default group.
    """
    context = _context_or_current(context)
    if not isinstance(maml, MAML):
        raise TypeError(f"maml must be a pymaml.MAML, got {type(maml).__name__}")
    if not isinstance(support_x, torch.Tensor) or support_x.dim() == 0:
        raise TypeError("support_x must be a tensor with a leading task dimension")
    local_tasks = support_x.shape[0]
    no_tasks = f"rank {context.rank} has no tasks; every rank needs at least one"
    if not context.is_distributed:
        if local_tasks == 0:
            raise ValueError(no_tasks)
        out = maml.meta_gradient(support_x, support_y, query_x, query_y, accumulate=accumulate)
        return DistributedMetaOutput(out.loss, out.task_losses, out.pre_adaptation_loss, out.backend, local_tasks, 1)
    context.require_process_group()
    params = _trained_parameters(maml)
    previous = [p.grad.detach().clone() if accumulate and p.grad is not None else None for p in params]
    like = params[0]
    failure = None
    try:
        if local_tasks == 0:
            raise ValueError(no_tasks)
        out = maml.meta_gradient(support_x, support_y, query_x, query_y, accumulate=False)
    except Exception as error:  # the other ranks wait in the all-reduce: join it, then all raise
        failure = error
    weight = float(local_tasks) if failure is None else 0.0
    # One buffer, one all-reduce: n_r·∇L^(r) for every parameter, n_r·L^(r), n_r·L_pre^(r), n_r, and
    # the count of ranks that failed.
    if failure is None:
        pieces = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(like.dtype) for p in params]
        pieces.append(torch.stack([out.loss.detach(), out.pre_adaptation_loss.detach()]).to(like.dtype))
        buffer = torch.cat(pieces).mul_(weight)
    else:
        buffer = torch.zeros(sum(p.numel() for p in params) + 2, dtype=like.dtype, device=like.device)
    buffer = torch.cat([buffer, torch.tensor([weight, float(failure is not None)], dtype=like.dtype,
                                             device=like.device)])
    torch.distributed.all_reduce(buffer)
    failed_ranks = int(round(buffer[-1].item()))
    if failure is not None:
        raise failure
    if failed_ranks:
        raise RuntimeError(f"the meta-gradient failed on {failed_ranks} other rank(s), whose error says why")
    total = buffer[-2]
    buffer = buffer[:-2] / total
    num_tasks = int(round(total.item()))
    offset = 0
    for p, before in zip(params, previous):
        reduced = buffer[offset:offset + p.numel()].view_as(p)
        offset += p.numel()
        if p.grad is None:
            p.grad = reduced.clone()
        else:
            p.grad.copy_(reduced)
        if before is not None:
            p.grad.add_(before)
    loss, pre_adaptation_loss = buffer[offset].to(out.loss.dtype), buffer[offset + 1].to(out.loss.dtype)
    return DistributedMetaOutput(loss, out.task_losses, pre_adaptation_loss, out.backend, num_tasks, context.world_size)


def broadcast_state(module: nn.Module, context: DistributedContext | None = None, source: int = 0) -> None:
    """Copies rank `source`'s parameters and buffers into every rank's module (in place), after
    checking that the ranks' modules have the same names, shapes and dtypes."""
    context = _context_or_current(context)
    if not context.is_distributed:
        return
    context.require_process_group()
    tensors = list(module.state_dict(keep_vars=True).items())
    context.check_same("the model's parameter and buffer names, shapes and dtypes",
                       [(name, tuple(t.shape), str(t.dtype)) for name, t in tensors])
    groups: dict[tuple, list[torch.Tensor]] = {}
    for _, tensor in tensors:
        groups.setdefault((tensor.dtype, tensor.device), []).append(tensor)
    with torch.no_grad():
        for group in groups.values():
            flat = torch.cat([t.detach().reshape(-1) for t in group])
            torch.distributed.broadcast(flat, src=source)
            offset = 0
            for tensor in group:
                tensor.copy_(flat[offset:offset + tensor.numel()].view_as(tensor))
                offset += tensor.numel()


class DistributedMAML:
    """A pymaml.MAML whose meta-gradients are all-reduced over the ranks of `context` (None: the
    initialized default process group). Wrapping broadcasts rank 0's weights, learned step sizes
    and buffers to every rank. meta_gradient and meta_train_step take this rank's shard of the
    meta-batch (self.shard(global_batch)). With a single-process context it is the plain MAML.
    """

    def __init__(self, maml: MAML, context: DistributedContext | None = None):
        if not isinstance(maml, MAML):
            raise TypeError(f"maml must be a pymaml.MAML, got {type(maml).__name__}")
        self.context = _context_or_current(context)
        self.maml = maml
        device = maml._device()
        if self.context.backend == "nccl" and device.type != "cuda":
            raise ValueError(f"the model is on {device} but the process group uses nccl, which needs CUDA tensors; "
                             "use gloo for a model on the CPU")
        broadcast_state(maml, self.context)

    @property
    def module(self) -> nn.Module:
        return self.maml.module

    def parameters(self):
        return self.maml.parameters()

    def shard(self, batch):
        return self.context.shard(batch)

    def meta_gradient(self, support_x, support_y, query_x, query_y, *, accumulate: bool = True) -> DistributedMetaOutput:
        """See pymaml.distributed.meta_gradient."""
        return meta_gradient(self.maml, support_x, support_y, query_x, query_y, context=self.context,
                             accumulate=accumulate)

    def meta_train_step(self, support_x, support_y, query_x, query_y,
                        optimizer: torch.optim.Optimizer) -> DistributedMetaOutput:
        """The all-reduced meta-gradient into .grad (replacing it), then optimizer.step() on this rank."""
        out = self.meta_gradient(support_x, support_y, query_x, query_y, accumulate=False)
        optimizer.step()
        return out
