"""Data-parallel training on PyTorch's own engine (``torch.distributed``), launched by torchrun.

Pyro has no data-parallel SVI, so the training loop does it itself, in a way that gives the same
posterior as one process:

* every rank runs with the same seed, so all ranks draw the same adapter noise at every step;
* each rank scores a contiguous shard of the global batch (:meth:`DistributedContext.shard`);
  its loss is an average over its shard (the ELBO's likelihood is scaled by N / local batch size
  and carries the full KL; the cross-entropy of LoRA and full fine-tuning averages over tokens);
* the gradients are summed across ranks, each weighted by its shard's share of the global
  batch (:meth:`DistributedContext.combine`): exactly the gradient of the one-process loss on the
  global batch (N / global batch size times the summed likelihood, plus the KL);
* clipping and the Adam step come after the reduction, so every rank holds the same parameters;
* rank 0 alone writes run folders, logs and checkpoints; the batch order and the RNG states do not
  depend on the world size, so a checkpoint resumes under any number of processes.

Outside torchrun (no process group) :func:`current` is a one-process context and nothing is
communicated. Gloo serves CPUs, NCCL serves GPUs (one per process, ``LOCAL_RANK``).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist

__all__ = [
    "DistributedContext",
    "current",
    "default_device",
    "destroy_distributed",
    "distributed_session",
    "init_distributed",
    "launched_by_torchrun",
]

T = TypeVar("T")
# Gradients are reduced in flat buckets of at most this many elements (one collective per bucket).
BUCKET_ELEMENTS = 1 << 24


def launched_by_torchrun() -> bool:
    """True in a process that torchrun (or another launcher) started as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def default_device() -> torch.device:
    """This process's GPU (``cuda:LOCAL_RANK``) when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def init_distributed(device: torch.device | None = None) -> "DistributedContext":
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...):
    NCCL when the device is a GPU, gloo otherwise. Without torchrun it does nothing."""
    device = device or default_device()
    if launched_by_torchrun() and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return current()


def destroy_distributed() -> None:
    """Leave the process group (if any); safe to call in one process."""
    if dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def distributed_session(device: torch.device | None = None) -> Iterator["DistributedContext"]:
    """The process group for the duration of a training run: joined on entry when torchrun
    launched this process, left on exit if this call joined it (an existing group is kept)."""
    joined = launched_by_torchrun() and not dist.is_initialized()
    context = init_distributed(device)
    try:
        yield context
    finally:
        if joined:
            destroy_distributed()


def current() -> "DistributedContext":
    """The context of the process group this process belongs to (one process when none)."""
    if dist.is_available() and dist.is_initialized():
        return DistributedContext(rank=dist.get_rank(), world_size=dist.get_world_size())
    return DistributedContext()


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands among the ranks, and the few collectives training needs."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and shows progress."""
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.world_size > 1

    def shard(self, indices: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous part of a global batch (sizes differ by at most one)."""
        if not self.parallel:
            return indices
        if len(indices) < self.world_size:
            raise ValueError(
                f"a global batch of {len(indices)} utterances cannot be shared by {self.world_size} processes; "
                f"set batch_size >= {self.world_size} (the number of processes)"
            )
        return torch.tensor_split(indices, self.world_size)[self.rank]

    def combine(self, parameters: Sequence[torch.Tensor], weight: float, values: Sequence[float]) -> list[float]:
        """Turn every rank's gradients into their weighted average, in place.

        ``weight`` is the amount this rank's loss averages over (utterances or tokens);
        ``values`` (e.g. loss terms, a stop flag) are averaged with the same weights and returned;
        all ranks get identical results. One process: nothing changes."""
        if not self.parallel:
            return list(values)
        reference = parameters[0]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
        scalars = torch.tensor([weight, *[weight * float(v) for v in values]], dtype=torch.float64,
                               device=reference.device)
        dist.all_reduce(scalars)
        total = float(scalars[0])
        for bucket in _buckets(grads):
            flat = torch.cat([g.reshape(-1) for g in bucket]).mul_(weight / total)
            dist.all_reduce(flat)
            offset = 0
            for g in bucket:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
        for p, g in zip(parameters, grads):
            p.grad = g
        return [float(v) / total for v in scalars[1:]]

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on at least one (e.g. a stop signal)."""
        if not self.parallel:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=_collective_device())
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item() > 0)

    def broadcast_parameters(self, parameters: Sequence[torch.Tensor]) -> None:
        """Give every rank rank 0's values (so ranks start equal even if seeded differently)."""
        if not self.parallel:
            return
        with torch.no_grad():
            for p in parameters:
                dist.broadcast(p.data, src=0)

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 only and hand its result, or the exception it raised, to every rank
        (e.g. checking and creating a run folder, reading a checkpoint)."""
        if not self.parallel:
            return fn()
        box: list[Any] = [None]
        if self.is_main:
            try:
                box[0] = ("ok", fn())
            except Exception as error:  # noqa: BLE001 - re-raised on every rank below
                box[0] = ("error", error)
        dist.broadcast_object_list(box, src=0)
        status, value = box[0]
        if status == "error":
            raise value
        return value

    def barrier(self) -> None:
        if self.parallel:
            dist.barrier()


def _collective_device() -> torch.device:
    return default_device() if dist.get_backend() == "nccl" else torch.device("cpu")


def _buckets(tensors: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
    buckets: list[list[torch.Tensor]] = [[]]
    size = 0
    for t in tensors:
        if buckets[-1] and size + t.numel() > BUCKET_ELEMENTS:
            buckets.append([])
            size = 0
        buckets[-1].append(t)
        size += t.numel()
    return [b for b in buckets if b]
