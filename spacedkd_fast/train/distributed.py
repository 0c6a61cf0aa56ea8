"""Multi-process training on PyTorch's own distributed engine (``torchrun``).

``torchrun --nproc_per_node N -m spacedkd_fast.train ...`` sets ``RANK``/``WORLD_SIZE``/
``LOCAL_RANK``; each process then trains DDP-wrapped teacher and student on its share of every keyed
batch (the data source splits each batch by rank, so a replay regenerates the same share), and rank
0 alone writes files. NCCL on GPUs, gloo on CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .errors import UserError


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size``; ``device`` it computes on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> ``cuda:<local rank>`` when a GPU is present, else ``cpu``; errors are explicit."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device name; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: no CUDA device is available here (torch "
                            f"{torch.__version__}, CUDA build {torch.version.cuda or 'none'}); use "
                            "--device cpu or --device auto")
        index = device.index if device.index is not None else local_rank
        if index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) "
                            "here; use --device cuda:0 or --device auto")
        device = torch.device("cuda", index)
    elif device.type not in ("cpu", "mps", "xpu"):
        raise UserError(f"--device {name}: unsupported device type {device.type!r}; use cpu, "
                        "cuda, cuda:N or auto")
    return device


def init_distributed(device_name: str) -> DistInfo:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1), else a solo run."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        try:
            dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                                    device_id=device if device.type == "cuda" else None)
        except RuntimeError as err:
            if not _restarted_on_a_shared_store():
                raise
            raise UserError(
                f"torchrun restarted the workers and they could not connect ({backend}: "
                f"{str(err).strip().splitlines()[0][:120]}): the agent shares its rendezvous store "
                "with them, which still holds the previous attempt's addresses; launch with "
                "python -m spacedkd_fast.train.torchrun, or set "
                "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for torchrun (docs/cluster.md)") from None
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def _restarted_on_a_shared_store() -> bool:
    """A torchrun restart (attempt > 0) whose workers use the agent's own store (PyTorch issue
    135712: the restarted workers may read the previous attempt's addresses from it)."""
    return (os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0"
            and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True")


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def wrap_ddp(model: nn.Module, info: DistInfo) -> nn.Module:
    """DDP-wrap ``model`` for a multi-process run; solo runs get the model back unchanged."""
    if not info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return DDP(model, device_ids=device_ids)


def average_gradients_of(module: nn.Module, info: DistInfo) -> None:
    """Average ``module``'s gradients across ranks during backward (for modules the engine owns).

    The engine creates the student's projection head itself, outside any DDP wrapper; without this
    each rank would train its own head. Hooks use a process group of their own so that their
    collectives never interleave with DDP's bucketed all-reduces on the default group.
    """
    if not info.enabled:
        return
    group = dist.new_group()
    world = float(info.world_size)

    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, group=group)
        return grad.div_(world)

    for p in module.parameters():
        if p.requires_grad:
            p.register_hook(hook)


def broadcast_parameters(module: nn.Module, info: DistInfo) -> None:
    """Give every rank rank 0's parameters and buffers (for modules outside DDP)."""
    if not info.enabled:
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(t)
    return t

