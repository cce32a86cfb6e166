"""The N-way K-shot task sampler over any class-indexed image set."""

from __future__ import annotations

import hashlib
from typing import NamedTuple

import torch


class FewShotBatch(NamedTuple):
    """N-way few-shot classification tasks.

    support_x [T, N·K, C, H, W] and query_x [T, N·Q, C, H, W]: floating images (uint8 datasets
    scaled to [0, 1]), grouped by label: the first K (or Q) points have label 0, the next label 1, ...
    support_y [T, N·K] and query_y [T, N·Q]: int64 labels 0..N−1, relabelled per task.
    classes [T, N]: the dataset label behind each task label; rotations [T, N]: the rotation in
    degrees (counter-clockwise) applied to that class's images; both on the CPU.
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    classes: torch.Tensor
    rotations: torch.Tensor

    @property
    def tasks(self):
        """The four tensors MAML takes: (support_x, support_y, query_x, query_y)."""
        return self.support_x, self.support_y, self.query_x, self.query_y


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


class FewShot:
    """N-way K-shot tasks drawn from a class-indexed image set.

    dataset: an object with `images` and `labels` (pymaml.data.Omniglot, for one) or a pair
        (images, labels). images: [M, C, H, W] or [M, H, W], a tensor or numpy array, uint8
        (scaled to [0, 1] when sampled) or floating (used as it is); labels: [M] integers.
    ways N, shots K, queries Q: each task draws N distinct classes, then K + Q distinct images of
        each (K support, Q query); every class needs at least K + Q images.
    rotations: None, or rotations in degrees (multiples of 90, e.g. (0, 90, 180, 270)) that make
        every (class, rotation) pair a class of its own, as is standard for Omniglot; rotations by
        90 or 270 degrees need square images.
    seed: task i is drawn from a generator seeded with (seed, i) alone, so `batch([i])` gives the
        same task whenever it is asked for and `sample` gives the same sequence for the same seed.
    dtype, device: of the images returned; the image array is moved to `device` once.

    The images are held in one array and gathered per batch with one index_select (one per
    rotation); nothing is read from disk here. `sample(tasks)` returns the next `tasks` tasks (indices next_task,
    next_task + 1, ...) and advances `next_task` (set it to resume a run).
    """

    def __init__(self, dataset, ways: int, shots: int, queries: int, rotations=None, seed: int = 0,
                 dtype: torch.dtype = torch.float32, device=None):
        self.ways = _positive_int("ways", ways)
        self.shots = _positive_int("shots", shots)
        self.queries = _positive_int("queries", queries)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        if not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating dtype, got {dtype}")
        self.seed, self.dtype = seed, dtype
        images, labels = (dataset.images, dataset.labels) if hasattr(dataset, "images") else dataset
        images, labels = torch.as_tensor(images), torch.as_tensor(labels)
        if images.dim() == 3:
            images = images.unsqueeze(1)
        if images.dim() != 4:
            raise ValueError(f"images must be [M, C, H, W] or [M, H, W], got shape {tuple(images.shape)}")
        if images.dtype != torch.uint8 and not images.is_floating_point():
            raise TypeError(f"images must be uint8 or floating, got {images.dtype}")
        if labels.shape != (images.shape[0],) or labels.is_floating_point() or labels.dtype == torch.bool:
            raise ValueError(f"labels must be {images.shape[0]} integers (one per image), got {labels.dtype} "
                             f"of shape {tuple(labels.shape)}")
        if images.shape[0] == 0:
            raise ValueError("the dataset has no images")
        if images.is_floating_point() and not bool(torch.isfinite(images).all()):
            raise ValueError("images contain NaN or Inf")
        self.rotations = self._check_rotations(rotations, images.shape)
        # self.images is sorted by class: class c holds rows offsets[c] .. offsets[c] + counts[c] - 1.
        self.class_labels, counts = torch.unique(labels, sorted=True, return_counts=True)
        order = torch.argsort(labels, stable=True)
        self.counts = counts
        self.offsets = torch.cumsum(counts, 0) - counts
        self.max_count = int(counts.max())
        self.positions = torch.arange(self.max_count)
        needed = self.shots + self.queries
        short = [(label, count) for label, count in zip(self.class_labels.tolist(), counts.tolist()) if count < needed]
        if short:
            listed = ", ".join(f"{label} ({count})" for label, count in short[:5])
            raise ValueError(f"{len(short)} classes have fewer than shots + queries = {needed} images, e.g. "
                             f"class (images): {listed}")
        self.num_classes = len(self.counts) * len(self.rotations)
        if self.ways > self.num_classes:
            raise ValueError(f"ways={self.ways} exceeds the {self.num_classes} classes of the dataset "
                             f"({len(self.counts)} labels × {len(self.rotations)} rotations)")
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self.images = images.index_select(0, order).contiguous().to(self.device)
        self.next_task = 0

    @staticmethod
    def _check_rotations(rotations, shape) -> tuple[int, ...]:
        if rotations is None:
            return (0,)
        rotations = tuple(rotations)
        if not rotations or len(set(rotations)) != len(rotations) or any(
                isinstance(r, bool) or not isinstance(r, int) or r % 90 for r in rotations):
            raise ValueError(f"rotations must be distinct multiples of 90 degrees, got {rotations!r}")
        if any(r % 180 for r in rotations) and shape[-1] != shape[-2]:
            raise ValueError(f"rotations by 90 or 270 degrees need square images, got {shape[-2]}×{shape[-1]}")
        return rotations

    def _task_generator(self, index: int) -> torch.Generator:
        digest = hashlib.blake2b(f"{self.seed}:{index}".encode(), digest_size=8).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))

    def _draw_task(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Task `index`: its N (label, rotation) pair numbers [N] and image rows [N, K + Q] of self.images."""
        generator = self._task_generator(index)
        pairs = torch.randperm(self.num_classes, generator=generator)[: self.ways]
        label_ids = pairs // len(self.rotations)
        # K + Q distinct images per class: the first K + Q of a random order of its images (random
        # keys, those past the class's image count pushed to the end).
        keys = torch.rand(self.ways, self.max_count, generator=generator, dtype=torch.float64)
        keys.masked_fill_(self.positions >= self.counts[label_ids, None], 2.0)
        picks = keys.argsort(dim=1)[:, : self.shots + self.queries]
        return pairs, picks + self.offsets[label_ids, None]

    def batch(self, indices) -> FewShotBatch:
        """The tasks with these indices (integers), in that order."""
        indices = [int(i) for i in indices]
        if not indices:
            raise ValueError("batch needs at least one task index")
        tasks, per_class, rotations = len(indices), self.shots + self.queries, len(self.rotations)
        drawn = [self._draw_task(index) for index in indices]
        pairs = torch.cat([pair for pair, _ in drawn])                     # [T·N]
        rows = torch.cat([row for _, row in drawn]).to(self.device)        # [T·N, K + Q]
        turns = pairs % rotations
        # index_select, and one gather per rotation, in place of boolean-mask indexing, which
        # is much slower (bench/RESULTS.md).
        if rotations == 1 and self.rotations[0] % 360 == 0:
            x = self.images.index_select(0, rows.reshape(-1))
        else:
            x = torch.empty((rows.numel(), *self.images.shape[1:]), dtype=self.images.dtype, device=self.device)
            offsets = torch.arange(per_class, device=self.device)
            for position, degrees in enumerate(self.rotations):
                which = (turns == position).nonzero().squeeze(1).to(self.device)
                if which.numel():
                    block = self.images.index_select(0, rows[which].reshape(-1))
                    if degrees % 360:
                        block = torch.rot90(block, k=degrees // 90, dims=(-2, -1))
                    x.index_copy_(0, (which[:, None] * per_class + offsets).reshape(-1), block)
        x = x.reshape(tasks, self.ways, per_class, *self.images.shape[1:])
        support = self._to_float(x[:, :, : self.shots].reshape(tasks, self.ways * self.shots, *x.shape[3:]))
        query = self._to_float(x[:, :, self.shots:].reshape(tasks, self.ways * self.queries, *x.shape[3:]))
        label_ids = torch.arange(self.ways, device=self.device)
        support_y = label_ids.repeat_interleave(self.shots).expand(tasks, -1).contiguous()
        query_y = label_ids.repeat_interleave(self.queries).expand(tasks, -1).contiguous()
        classes = self.class_labels[pairs // rotations].reshape(tasks, self.ways)
        degrees = torch.tensor(self.rotations)[turns].reshape(tasks, self.ways)
        return FewShotBatch(support, support_y, query, query_y, classes, degrees)

    def _to_float(self, images: torch.Tensor) -> torch.Tensor:
        converted = images.to(self.dtype)
        return converted.div_(255) if images.dtype == torch.uint8 else converted

    def sample(self, tasks: int) -> FewShotBatch:
        """The next `tasks` tasks."""
        _positive_int("tasks", tasks)
        start, self.next_task = self.next_task, self.next_task + tasks
        return self.batch(range(start, start + tasks))
