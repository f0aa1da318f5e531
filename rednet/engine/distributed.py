"""torch.distributed set-up for torchrun (one process, one node, several nodes)."""
from __future__ import annotations

import datetime
import os
import pickle
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

__all__ = [
    "DistInfo",
    "all_reduce",
    "barrier",
    "cleanup_distributed",
    "gather_to_main",
    "init_distributed",
    "is_restarted_worker",
    "run_on_main",
]


@dataclass
class DistInfo:
    """This process's place in the job.

    Args:
        rank / world_size: global rank and number of processes.
        local_rank: rank on this node (selects the GPU).
        device: where the model runs.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto", timeout_min: float = 30.0) -> DistInfo:
    """Join the process group torchrun describes in the environment (NCCL on GPUs, gloo on CPU).

    Without torchrun (no ``WORLD_SIZE``) or with one process, no group is created.

    Args:
        device: ``auto`` (CUDA when present), ``cpu`` or ``cuda``.
        timeout_min: collective timeout; long enough for rank 0 to write a large checkpoint.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            timeout=datetime.timedelta(minutes=timeout_min),
            device_id=dev if use_cuda else None,
        )
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def is_restarted_worker() -> bool:
    """True in a worker that ``torchrun --max-restarts`` restarted after a failure."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce when a group exists (a no-op otherwise); returns ``t``."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
    return t


def group_initialized() -> bool:
    """True when this process belongs to a process group (``init_distributed`` made one, or a caller did)."""
    return dist.is_available() and dist.is_initialized()


def _grouped() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_to_main(obj: Any) -> Optional[list[Any]]:
    """Every rank's ``obj`` (picklable), indexed by rank, on rank 0; None on the other ranks.

    Without a process group: ``[obj]``.
    """
    if not _grouped():
        return [obj]
    rank = dist.get_rank()
    out = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def run_on_main(fn: Callable[[], Any]) -> Any:
    """``fn()`` on rank 0 only; every rank returns its result, or raises the exception it raised.

    For decisions that read or change shared files: one rank decides, so every rank acts on
    the same answer, and an error on rank 0 reaches the others instead of leaving them waiting.
    """
    if not _grouped():
        return fn()
    box: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = (fn(), None)
        except Exception as e:  # noqa: BLE001  forwarded to every rank, then raised on each
            try:
                pickle.dumps(e)
                box[0] = (None, e)
            except Exception:  # noqa: BLE001  an exception that cannot travel: its text can
                box[0] = (None, RuntimeError(f"rank 0: {type(e).__name__}: {e}"))
            dist.broadcast_object_list(box, src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    result, error = box[0]
    if error is not None:
        raise error
    return result


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
