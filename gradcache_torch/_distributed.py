"""The core's :class:`gradcache.Collective` over ``torch.distributed``, and the wrappers it must know.

Every byte moves through ``torch.distributed`` collectives on the caller's process group (gloo,
NCCL, whatever ``torchrun`` set up): representations are all-gathered with padding to the largest
rank so that ranks may hold different numbers of rows, and the small agreements of the core's
:class:`gradcache.Rendezvous` are ``all_gather_object`` calls. Parameter gradients are averaged over
ranks once per step: FSDP2 reduce-scatters in the last chunk's backward (its sync is off for the
others); DDP's hooks are bypassed for the whole step and :class:`GradientSync` averages what the
step added to DDP and unwrapped modules, after the ranks' last agreement, with bucketed
all-reduces as DDP would, inside the step's rollback. Both average, so representation gradients
are scaled by the world size. Steps are numbered per process group (:meth:`TorchCollective.step_counter`),
whichever call made the collective.
"""

from __future__ import annotations

import weakref
from collections.abc import Collection, Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from gradcache import Collective, GradCacheError
from gradcache._collective import StepCounter


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
    group_type = getattr(dist, "ProcessGroup", None) if dist.is_available() else None
    if distributed is not True and not (group_type and isinstance(distributed, group_type)):
        raise GradCacheError(
            f"distributed= takes False, True (the default process group), a "
            f"torch.distributed.ProcessGroup or a gradcache.Collective, got {distributed!r}")
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

    def step_counter(self) -> StepCounter:
        # a step makes its own collective: the count lives with the process group
        group = self.group if self.group is not None else dist.group.WORLD
        try:
            return _STEP_COUNTERS.setdefault(group, StepCounter())
        except TypeError:   # a group object that takes no weak reference: count per collective
            return super().step_counter()

    def all_gather_rows(self, leaf: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        counts = list(counts)
        most = max(counts)
        mine = _padded(leaf.contiguous(), most)
        # one output buffer, no concatenation: the gathered batch exists once
        out = mine.new_empty((len(counts) * most,) + tuple(mine.shape[1:]))
        _all_gather_single(out, mine, group=self.group)
        self.bytes_communicated += out.numel() * out.element_size()
        if len(set(counts)) == 1:
            return out
        keep = torch.cat([torch.arange(rank * most, rank * most + count, device=out.device)
                          for rank, count in enumerate(counts)])
        return out.index_select(0, keep)

    def local_rows(self, leaf: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        start = sum(counts[:self.rank])
        return leaf[start:start + counts[self.rank]]

    def reduce_scatter_rows(self, leaf: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        counts = list(counts)
        most = max(counts)
        if len(set(counts)) == 1:
            full = leaf.contiguous()
        else:   # equal shares for the collective: every rank's rows padded to the largest
            full = torch.cat([_padded(part, most) for part in torch.split(leaf, counts)])
        out = full.new_empty((most,) + tuple(full.shape[1:]))
        _reduce_scatter_single(out, full, group=self.group)
        self.bytes_communicated += full.numel() * full.element_size()
        return out[:counts[self.rank]]

    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        total = value.detach().clone()
        dist.all_reduce(total, group=self.group)
        self.bytes_communicated += total.numel() * total.element_size()
        return total


#: the agreeing steps begun per process group (see :meth:`TorchCollective.step_counter`)
_STEP_COUNTERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _all_gather_single(out: torch.Tensor, mine: torch.Tensor, group: Any) -> None:
    # torch 2.13 renamed all_gather_into_tensor (deprecated there) to all_gather_single
    if hasattr(dist, "all_gather_single"):
        dist.all_gather_single(out, mine, group=group)
    else:  # pragma: no cover - older torch
        dist.all_gather_into_tensor(out, mine, group=group)


def _reduce_scatter_single(out: torch.Tensor, full: torch.Tensor, group: Any) -> None:
    if hasattr(dist, "reduce_scatter_single"):
        dist.reduce_scatter_single(out, full, group=group)
    else:  # pragma: no cover - older torch
        dist.reduce_scatter_tensor(out, full, group=group)


def _padded(rows: torch.Tensor, most: int) -> torch.Tensor:
    """``rows`` with zero rows appended up to ``most`` (collectives move equal shapes)."""
    if rows.shape[0] == most:
        return rows
    return torch.cat([rows, rows.new_zeros((most - rows.shape[0],) + tuple(rows.shape[1:]))])


def all_gather_rows(tensor: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Every rank's ``tensor`` concatenated along rows in rank order (ranks may differ in rows).

    For per-row loss arguments (labels, weights) of a distributed step, whose loss sees the global
    batch: pass ``loss_kwargs={"labels": all_gather_rows(labels)}``. Not differentiable.
    """
    collective = TorchCollective(group)
    counts = collective.exchange(int(tensor.shape[0]))
    return collective.all_gather_rows(tensor.detach(), counts)


def fsdp_units(module: Any) -> list[Any]:
    """The FSDP2 units in ``module`` (itself included): the modules whose gradient sync a step
    toggles. Empty for anything that is not an ``nn.Module`` or holds no ``fully_shard`` unit."""
    if fsdp_module_type() is None or not isinstance(module, torch.nn.Module):
        return []
    return [sub for sub in module.modules() if is_fsdp(sub)]


class GradientSync:
    """Averages over ranks what one distributed step adds to the gradients of the modules that
    FSDP2 does not reduce itself: DDP-wrapped modules (whose hooks the step bypasses for every
    chunk) and unwrapped ones.

    Before the step the caller's gradients are set aside (kept, not copied) and ``.grad`` starts
    empty; after the step's last agreement, :meth:`finish` averages this step's gradients over the
    ranks with bucketed all-reduces -- DDP's own reduction, done once -- and adds them *into* the
    gradient objects set aside (in place, as ``backward`` accumulates: views of one flat buffer,
    such as DDP's ``gradient_as_bucket_view``, stay views of it); a parameter no rank touched keeps
    its gradient (``None`` stays ``None``). Every all-reduce runs before the first gradient is
    written, so a rank that dies after the agreement makes the others raise from :meth:`finish`
    with nothing written; :meth:`restore` then puts the caller's very objects back, untouched.
    Bypassing DDP entirely, rather than letting it synchronise in the last chunk, keeps the step
    exact when a parameter is not used by that chunk (a second tower, a loss-owned temperature
    inside the module), which DDP would otherwise leave unreduced without a word. Sparse gradients
    (``nn.Embedding(sparse=True)``) get one sparse all-reduce each and stay sparse, as with DDP.
    """

    #: the all-reduce bucket, as DDP's default
    BUCKET_BYTES = 25 * 2**20

    def __init__(self, modules: Iterable[tuple[Any, Any, Collection[str]]]):
        """``modules``: ``(module, process group, names of the parameters DDP ignores)``; an
        ignored parameter (``_ddp_params_and_buffers_to_ignore``) keeps this rank's own gradient,
        as under DDP."""
        self.groups: list[tuple[Any, list[torch.nn.Parameter]]] = []
        seen: set[int] = set()
        #: parameters of modules that make sparse gradients (``nn.Embedding(sparse=True)``),
        #: told by the module as DDP tells them, so that every rank agrees whatever it touched
        self.sparse: set[int] = set()
        modules = list(modules)
        for module, _, _ in modules:
            for sub in module.modules():
                if isinstance(sub, (torch.nn.Embedding, torch.nn.EmbeddingBag)) and sub.sparse:
                    self.sparse.update(id(p) for p in sub.parameters(recurse=False))
        for module, group, ignored in modules:
            params = [p for name, p in module.named_parameters()
                      if p.requires_grad and id(p) not in seen and name not in ignored]
            seen.update(id(p) for p in params)
            if params:
                self.groups.append((group, params))
        self.set_aside = [[p.grad for p in params] for _, params in self.groups]
        for _, params in self.groups:
            for parameter in params:
                parameter.grad = None

    def restore(self) -> None:
        """The caller's gradient objects back in ``.grad``, as they were (never written to)."""
        for (_, params), aside in zip(self.groups, self.set_aside):
            for parameter, grad in zip(params, aside):
                parameter.grad = grad

    def finish(self) -> None:
        """Averages the step's gradients and accumulates them into the caller's; raises with
        nothing written if any all-reduce fails (then call :meth:`restore`)."""
        means = [self._average(group, params) for group, params in self.groups]
        # every collective has succeeded: only local writes from here on
        for (_, params), aside, averaged in zip(self.groups, self.set_aside, means):
            for parameter, before, mean in zip(params, aside, averaged):
                if mean is None:
                    parameter.grad = before
                elif before is None:
                    parameter.grad = mean
                else:
                    before.add_(mean)
                    parameter.grad = before

    def _average(self, group: Any, params: list) -> list[torch.Tensor | None]:
        """The mean over ranks of each parameter's step gradient (``None`` where no rank has one)."""
        world = dist.get_world_size(group)
        means: list[torch.Tensor | None] = [None] * len(params)
        sparse = [index for index, parameter in enumerate(params) if id(parameter) in self.sparse]
        if sparse:
            self._average_sparse(group, params, sparse, means)
        buckets: dict[tuple, list[list[int]]] = {}
        for index, parameter in enumerate(params):
            if id(parameter) in self.sparse:
                continue
            runs = buckets.setdefault((parameter.dtype, parameter.device), [[]])
            size = sum(params[i].numel() for i in runs[-1]) * parameter.element_size()
            if runs[-1] and size + parameter.numel() * parameter.element_size() > self.BUCKET_BYTES:
                runs.append([])
            runs[-1].append(index)
        for runs in buckets.values():
            for run in runs:
                # one all-reduce per bucket; its tail counts the ranks that touched each parameter,
                # so that a parameter no rank used keeps its gradient (None stays None)
                # (a sparse gradient from a module not known to make them is averaged densely)
                grads = [_dense(params[i].grad) if params[i].grad is not None
                         else torch.zeros_like(params[i]) for i in run]
                touched = torch.tensor([float(params[i].grad is not None) for i in run],
                                       dtype=grads[0].dtype, device=grads[0].device)
                flat = torch.cat([grad.reshape(-1) for grad in grads] + [touched])
                del grads
                dist.all_reduce(flat, group=group)
                flat[:-len(run)].div_(world)
                sizes = [params[i].numel() for i in run]
                parts = torch.split(flat, sizes + [len(run)])
                for i, part, count in zip(run, parts, parts[-1].tolist()):
                    # the bucket holds the step's share now: free it (a failure restores what
                    # was set aside, never the step's gradients)
                    params[i].grad = None
                    if count:
                        means[i] = part.view_as(params[i])
        return means

    @staticmethod
    def _average_sparse(group: Any, params: list, indices: list[int],
                        means: list[torch.Tensor | None]) -> None:
        """The sparse gradients' means, one sparse all-reduce per parameter (as DDP reduces them:
        the rows no rank touched are never sent), and one all-reduce of who touched which."""
        world = dist.get_world_size(group)
        first = params[indices[0]]
        touched = torch.tensor([float(params[i].grad is not None) for i in indices],
                               dtype=torch.float64, device=first.device)
        dist.all_reduce(touched, group=group)
        for i, count in zip(indices, touched.tolist()):
            parameter = params[i]
            if not count:
                continue
            grad = parameter.grad
            if grad is None:   # this rank did not touch it: no rows of its own
                grad = torch.sparse_coo_tensor(
                    torch.empty((1, 0), dtype=torch.long, device=parameter.device),
                    parameter.new_empty((0, *parameter.shape[1:])), parameter.shape)
            grad = grad.coalesce() if grad.is_sparse else grad.to_sparse(1)
            work = dist.all_reduce(grad, group=group, async_op=True)
            assert work is not None
            work.wait()
            parameter.grad = None
            means[i] = work.get_future().value()[0] / world


def _dense(grad: torch.Tensor) -> torch.Tensor:
    return grad.to_dense() if grad.is_sparse else grad


def broadcast_buffers(module: Any, group: Any, ignored: Collection[str] = ()) -> None:
    """Rank 0's buffers to every rank, as DDP does before each forward (``broadcast_buffers``),
    but those DDP ignores (named in ``ignored``)."""
    source = 0 if group is None else dist.get_global_rank(group, 0)
    for name, buffer in module.named_buffers():
        if name not in ignored:
            dist.broadcast(buffer.data, src=source, group=group)
