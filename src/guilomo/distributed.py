"""Several processes of one job under `torchrun` (one per GPU of a node; gloo on CPU, NCCL
on GPUs): who am I, and sums across processes. In a single process every helper is a no-op.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed() -> None:
    """Join the process group torchrun describes (no-op for a single process)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    if torch.cuda.is_available():
        # one GPU per process: NCCL collectives (barrier included) run on this process's GPU
        gpu = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(gpu)
        dist.init_process_group("nccl", device_id=gpu)
    else:
        dist.init_process_group("gloo")


def step_seed(seed: int, step: int, rank: int) -> int:
    """The RNG seed (dropout) of one step of one process: a function of where the run is, so
    a resumed run, or any rank of a resumed torchrun job, draws what the uninterrupted one drew."""
    return (seed * 1_000_003 + step) * 1024 + rank


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


def all_reduce_sum(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The element-wise sums of `tensors` over all processes, in one collective (flattened
    into one buffer of their widest dtype); shapes and dtypes kept, the inputs untouched."""
    if world()[1] == 1 or not tensors:
        return list(tensors)
    flat = torch.cat([t.reshape(-1) for t in tensors])  # (sum of numels,)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    parts = flat.split([t.numel() for t in tensors])
    return [p.view(t.shape).to(t.dtype) for p, t in zip(parts, tensors, strict=True)]
