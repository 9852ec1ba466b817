"""The core's :class:`gradcache.Collective` over ``torch.distributed``, and the wrappers it must know.

Every byte moves through ``torch.distributed`` collectives on the caller's process group (gloo,
NCCL, whatever ``torchrun`` set up): representations are all-gathered with padding to the largest
rank so that ranks may hold different numbers of rows, and the small agreements of the core's
:class:`gradcache.Rendezvous` are ``all_gather_object`` calls. Gradient synchronisation stays with the
wrapper that owns it -- DDP's all-reduce, FSDP2's reduce-scatter -- which run once per module per
step because the backend lets them synchronise on the last chunk only. Both *average* over ranks,
so representation gradients are scaled by the world size; a module with no wrapper gets the same
average from one all-reduce of what this step added to its gradients.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from gradcache import Collective, GradCacheError


def fsdp_module_type() -> type | None:
    """``torch.distributed.fsdp.FSDPModule`` (FSDP2's ``fully_shard``), where this torch has it."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return None
    return FSDPModule


def is_ddp(module: Any) -> bool:
    return isinstance(module, torch.nn.parallel.DistributedDataParallel)


def is_fsdp(module: Any) -> bool:
    fsdp = fsdp_module_type()
    return fsdp is not None and isinstance(module, fsdp)


def resolve_group(distributed: Any) -> Any:
    """The process group a ``distributed=`` argument names (``True``: the default group)."""
    if not dist.is_available() or not dist.is_initialized():
        raise GradCacheError(
            "distributed=... needs an initialised torch.distributed process group: call "
            "torch.distributed.init_process_group (torchrun sets up its environment) first")
    return None if distributed is True else distributed


class TorchCollective(Collective):
    """Rank ``dist.get_rank(group)`` of a process group, as the core's collective.

    Args:
        group: a ``ProcessGroup``, or ``None`` for the default group.
        grad_scale: the factor for representation gradients (the world size: every wrapper this
            adapter drives averages over ranks).
        same_chunk_counts: the encoders communicate in every call (FSDP2), so every rank must run
            as many chunks.
    """

    agrees = True

    def __init__(self, group: Any = None, *, grad_scale: float | None = None,
                 same_chunk_counts: bool = False):
        self.group = group
        self.same_chunk_counts = same_chunk_counts
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.grad_scale = float(self.world_size if grad_scale is None else grad_scale)
        #: bytes of the global tensors this rank's tensor collectives moved (an all-gather's
        #: output, a reduce-scatter's input, an all-reduce's tensor), the benchmark's measure
        self.bytes_communicated = 0

    def exchange(self, payload: Any) -> list[Any]:
        reports: list[Any] = [None] * self.world_size
        dist.all_gather_object(reports, payload, group=self.group)
        return reports

    def all_gather_rows(self, leaf: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        counts = list(counts)
        most = max(counts)
        mine = leaf.contiguous()
        if mine.shape[0] < most:   # collectives move equal shapes: pad, then cut each rank's rows
            pad = mine.new_zeros((most - mine.shape[0],) + tuple(mine.shape[1:]))
            mine = torch.cat([mine, pad])
        parts = [torch.empty_like(mine) for _ in counts]
        dist.all_gather(parts, mine, group=self.group)
        self.bytes_communicated += len(parts) * mine.numel() * mine.element_size()
        return torch.cat([part[:count] for part, count in zip(parts, counts)])

    def local_rows(self, leaf: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        start = sum(counts[:self.rank])
        return leaf[start:start + counts[self.rank]]

    def reduce_scatter_rows(self, leaf: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        counts = list(counts)
        most = max(counts)
        parts = []
        for part in torch.split(leaf, counts):
            if part.shape[0] < most:
                part = torch.cat([part, part.new_zeros((most - part.shape[0],) + tuple(part.shape[1:]))])
            parts.append(part.contiguous())
        out = torch.empty_like(parts[0])
        dist.reduce_scatter(out, parts, group=self.group)
        self.bytes_communicated += sum(part.numel() * part.element_size() for part in parts)
        return out[:counts[self.rank]]

    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        total = value.detach().clone()
        dist.all_reduce(total, group=self.group)
        self.bytes_communicated += total.numel() * total.element_size()
        return total


def all_gather_rows(tensor: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Every rank's ``tensor`` concatenated along rows in rank order (ranks may differ in rows).

    For per-row loss arguments (labels, weights) of a distributed step, whose loss sees the global
    batch: pass ``loss_kwargs={"labels": all_gather_rows(labels)}``. Not differentiable.
    """
    collective = TorchCollective(group)
    counts = collective.exchange(int(tensor.shape[0]))
    return collective.all_gather_rows(tensor.detach(), counts)


class PlainModuleSync:
    """Averages over ranks what one step adds to the gradients of modules with no DDP/FSDP wrapper.

    Snapshot before the step, one flat all-reduce of the increments after it: the same averaging
    DDP applies, so that with the core's ``grad_scale`` the result is the global-batch gradient.
    """

    def __init__(self, modules: Iterable[Any], group: Any):
        self.group = group
        seen: dict[int, torch.nn.Parameter] = {}
        for module in modules:
            for parameter in module.parameters():
                if parameter.requires_grad:
                    seen.setdefault(id(parameter), parameter)
        self.parameters = list(seen.values())
        self.before = [None if p.grad is None else p.grad.detach().clone() for p in self.parameters]

    def __call__(self) -> None:
        buckets: dict[tuple, list[tuple[torch.nn.Parameter, torch.Tensor | None]]] = {}
        for parameter, before in zip(self.parameters, self.before):
            buckets.setdefault((parameter.dtype, parameter.device), []).append((parameter, before))
        world = dist.get_world_size(self.group)
        for members in buckets.values():   # one all-reduce per dtype and device, usually one
            increments = []
            for parameter, before in members:
                grad = parameter.grad if parameter.grad is not None else torch.zeros_like(parameter)
                increments.append((grad if before is None else grad - before).reshape(-1))
            flat = torch.cat(increments)
            dist.all_reduce(flat, group=self.group)
            flat /= world
            for (parameter, before), part in zip(members, torch.split(flat, [p.numel() for p, _ in members])):
                increment = part.view_as(parameter)
                parameter.grad = increment.clone() if before is None else before + increment
