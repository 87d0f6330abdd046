"""Running one command as several processes started by ``torchrun`` or ``accelerate launch``.

Both launchers start one process per device and tell each its place through the environment (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``); this module reads those and joins the processes
with :mod:`torch.distributed` (``gloo`` on CPU; ``nccl`` for CUDA tensors plus ``gloo`` for small messages). Nothing
here needs ``accelerate`` itself: it is only the launcher (``pip install -e .[distributed]``). Without those
variables every helper is a no-op and the command runs as one process, as before.
"""

from __future__ import annotations

import datetime
import os
from typing import Any

import torch

from .errors import DualAnoDiffError

#: how long a process waits for the others at a meeting point (generation: the slowest shard)
TIMEOUT = datetime.timedelta(hours=24)


class DistributedError(DualAnoDiffError, ValueError):
    """The launcher's environment cannot be used as it is."""


def _int_env(name: str, default: int) -> int:
    v = os.environ.get(name)
    if v is None or v == "":
        return default
    try:
        return int(v)
    except ValueError:
        raise DistributedError(
            f"environment variable {name}={v!r} is not a whole number (set by the launcher)"
        ) from None


def world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return max(1, _int_env("WORLD_SIZE", 1))


def rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return _int_env("RANK", 0)


def local_rank() -> int:
    return _int_env("LOCAL_RANK", 0)


def is_distributed() -> bool:
    """True when started as one of several processes (``WORLD_SIZE`` > 1)."""
    return world_size() > 1


def is_main() -> bool:
    return rank() == 0


def init() -> bool:
    """Join the process group when launched as several processes; returns whether it did (or already had)."""
    if not is_distributed():
        return False
    if not torch.distributed.is_available():
        raise DistributedError("this PyTorch has no torch.distributed; run one process (without torchrun)")
    if torch.distributed.is_initialized():
        return True
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK"):
        if not os.environ.get(name):
            raise DistributedError(
                f"WORLD_SIZE={os.environ.get('WORLD_SIZE')} but {name} is not set: start the processes with torchrun "
                "or accelerate launch (they set RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT), or unset WORLD_SIZE"
            )
    backend = "gloo"
    if torch.cuda.is_available() and torch.distributed.is_nccl_available():
        # gradients on the GPU go through NCCL; small messages and barriers through gloo (object collectives pick
        # the CPU backend when both are given). NCCL needs each process on its own device first.
        torch.cuda.set_device(local_rank() % max(1, torch.cuda.device_count()))
        backend = "cpu:gloo,cuda:nccl"
    torch.distributed.init_process_group(backend=backend, timeout=TIMEOUT)
    return True


def close() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def device_for_process(name: str) -> str:
    """``auto``/``cuda`` -> this process's own GPU (``cuda:LOCAL_RANK``) when there are several processes; an
    explicit ``cuda:K`` or ``cpu`` is kept."""
    if not is_distributed():
        return name
    if name in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{local_rank() % max(1, torch.cuda.device_count())}"
    return name


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def broadcast(obj: Any, src: int = 0) -> Any:
    """``obj`` of process ``src`` on every process (picklable, small)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def all_gather(obj: Any) -> list[Any]:
    """Every process's ``obj``, in rank order (picklable, small)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [obj]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def any_true(flag: bool, device: str | torch.device = "cpu") -> bool:
    """True on every process when ``flag`` is True on any (e.g. a stop request)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item() > 0)


def mean(value: float, device: str | torch.device = "cpu") -> float:
    """The mean of ``value`` over the processes (float64)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return float(t.item()) / torch.distributed.get_world_size()


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Average the gradients of ``params`` over the processes, in one flat collective. A parameter without a
    gradient counts as zero and keeps ``grad=None`` (which tensors get none depends on the model, not the data, so
    it is the same on every process)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    n = torch.distributed.get_world_size()
    if not params:
        return
    dev = params[0].device
    flat = torch.cat(
        [
            (p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1).to(dev, torch.float32)
            for p in params
        ]
    )
    torch.distributed.all_reduce(flat)
    flat /= n
    offset = 0
    for p in params:
        k = p.numel()
        if p.grad is not None:
            p.grad.copy_(flat[offset : offset + k].view_as(p.grad).to(p.grad.dtype))
        offset += k
