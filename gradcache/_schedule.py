"""The two-pass gradient-cache schedule, written once for every backend.

This is the algorithm of Gao et al. (2021): encode every chunk of every input group without a graph
(pass 1, recording each chunk's random state), take the loss and its gradient with respect to the
full-batch representations, then re-encode each chunk with a graph under the replayed random state
and pull the cached gradient slice back into the parameters (pass 2). It validates inputs before any
gradient is touched, words errors with the group, the chunk and the shapes, and runs the step inside
the backend's transaction so that a failure leaves the caller's gradients as they were. It talks to
frameworks only through :class:`gradcache.Backend` and must never import one.
"""

from __future__ import annotations

import inspect
import numbers
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gradcache import _padding, _tree
from gradcache._autodiff import loss_and_rep_grads, pullback
from gradcache._backend import Backend, ChunkPlan, values_known
from gradcache._chunks import Chunk, ChunkItems, loop_length, run_chunks
from gradcache._collective import Collective, Rendezvous
from gradcache._errors import GradCacheError, add_location_note, where
from gradcache._options import StepOptions


@dataclass
class GroupPlan:
    """Everything the schedule knows about one input group before it runs."""

    index: int
    encoder: Any
    inputs: Any
    plan: ChunkPlan | None          # None until pass 1 when a split_fn made the chunks
    get_rep: Callable
    pre_split: list | None = None   # chunks made by a user split_fn
    last_for_encoder: bool = False  # the last group pulled back through this encoder
    rep_takes_inputs: bool = False  # get_rep(output, chunk_inputs) rather than get_rep(output)
    frozen: bool = False            # nothing to train: encoded once, skipped in pass 2
    rows: int | None = None         # a split_fn's group: its rows, where the core can count them

    def picker(self, chunk_inputs: Any) -> Callable:
        """``get_rep`` for one chunk: given the chunk's inputs too when it takes them."""
        if not self.rep_takes_inputs:
            return self.get_rep
        return lambda output: self.get_rep(output, chunk_inputs)

    @property
    def planned(self) -> ChunkPlan:
        """:attr:`plan` where it is known: from the start, or after pass 1 for a split_fn."""
        assert self.plan is not None, "a split_fn's chunks are planned in pass 1"
        return self.plan

    @property
    def num_chunks(self) -> int:
        """The chunks this group encodes, before or after pass 1."""
        if self.plan:
            return self.plan.num_chunks
        assert self.pre_split is not None, "no plan yet: a split_fn made the chunks"
        return len(self.pre_split)


def _identity(value: Any) -> Any:
    return value


@dataclass
class KeptGraph:
    """The first chunk that pass 2 pulls back, encoded in pass 1 with its graph (when the backend
    keeps it: :meth:`gradcache.Backend.encode_keeping_graph`). Pass 2 pulls back through it
    instead of re-encoding that chunk, first, and lets it go."""

    group: int
    rep: Any = None
    intact: Callable[[], bool] | None = None   # the backend's: can the graph still be pulled back

    def holds(self, group: int, chunk: Chunk) -> bool:
        """Whether ``chunk`` of ``group`` is the kept one (chunk 0, run by itself)."""
        return group == self.group and isinstance(chunk.index, int) and chunk.index == 0


class _KeptOutput:
    """An "encoder" that returns the kept representation, whatever it is called with: what pass 2
    hands the backend's ``vjp`` for the kept chunk, so that it pulls back through pass 1's graph."""

    def __init__(self, rep: Any):
        self.rep = rep

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.rep


def _takes_inputs(get_rep: Callable) -> bool:
    """Whether ``get_rep`` takes the chunk's inputs after the output (``get_rep(output, inputs)``,
    for pooling over an attention mask): it accepts two positional arguments."""
    try:
        parameters = inspect.signature(get_rep).parameters.values()
    except (TypeError, ValueError):   # builtins such as operator.itemgetter: one argument
        return False
    positional = [p for p in parameters
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if any(p.kind is p.VAR_POSITIONAL for p in parameters):
        return False   # f(*args): keep the documented one-argument call
    return len(positional) >= 2 and all(p.default is p.empty for p in positional[1:2])


def _as_chunk_size(value: Any, group: int) -> int:
    if isinstance(value, bool):
        raise GradCacheError(f"chunk_size for {where(group)} must be an int >= 1, got {value!r}")
    try:
        size = operator.index(value)
    except TypeError:
        raise GradCacheError(
            f"chunk_size for {where(group)} must be an int >= 1, got {value!r} "
            f"({type(value).__name__})") from None
    if size < 1:
        raise GradCacheError(f"chunk_size for {where(group)} must be an int >= 1, got {size}")
    return size


def _per_group(value: Any, num_groups: int, what: str, is_single: Callable[[Any], bool]) -> list:
    """Broadcasts a single value to every group, or checks a sequence aligned with the groups."""
    if is_single(value):
        return [value] * num_groups
    if not isinstance(value, Sequence) or isinstance(value, (str, bytes)):
        raise GradCacheError(f"{what} must be one value or a sequence with one per input group, "
                             f"got {type(value).__name__}")
    if len(value) != num_groups:
        raise GradCacheError(f"got {len(value)} {what} for {num_groups} input groups; pass one "
                             f"shared value or exactly one per group")
    return list(value)


def describe_shapes(backend: Backend, tree: Any) -> str:
    """``input_ids: (8, 32), attention_mask: (8, 32)`` for error messages."""
    leaves, spec = _tree.flatten(tree, backend.is_leaf)
    paths = _tree.leaf_paths(spec)
    return ", ".join(f"{path}: {tuple(backend.shape(leaf))}" for path, leaf in zip(paths, leaves))


def group_batch_size(backend: Backend, tree: Any, group: int) -> int:
    """The common number of rows of every tensor leaf in ``tree``, or a GradCacheError."""
    leaves, spec = _tree.flatten(tree, backend.is_leaf)
    if not leaves:
        raise GradCacheError(
            f"input {where(group)} holds no {backend.name} tensor (got {type(tree).__name__}); pass "
            f"tensors, or nested dicts/lists/tuples of tensors, or give a split_fn")
    paths = _tree.leaf_paths(spec)
    sizes: list[int] = []
    for path, leaf in zip(paths, leaves):
        size = backend.batch_size(leaf)
        if size is None:
            raise GradCacheError(
                f"input {where(group)}: leaf '{path}' of shape {tuple(backend.shape(leaf))} has no "
                f"batch dimension; every tensor leaf is batched along dimension 0")
        sizes.append(size)
    if len(set(sizes)) != 1:
        raise GradCacheError(
            f"input {where(group)}: tensor leaves disagree on the batch size (dimension 0): "
            f"{describe_shapes(backend, tree)}")
    if sizes[0] == 0:
        raise GradCacheError(f"input {where(group)} is empty: {describe_shapes(backend, tree)}")
    return sizes[0]


def countable_rows(backend: Backend, tree: Any) -> int | None:
    """The rows of an input the core can count without slicing it, or ``None``.

    Tensor leaves that agree on their first dimension have that many rows; a list or tuple of
    strings (raw texts for a ``split_fn`` to tokenise) has one row per string. Anything else (a
    custom batch object, leaves of different lengths) is the ``split_fn``'s own business.
    """
    leaves, _ = _tree.flatten(tree, backend.is_leaf)
    if leaves:
        sizes = {backend.batch_size(leaf) for leaf in leaves}
        return sizes.pop() if len(sizes) == 1 and None not in sizes else None
    if isinstance(tree, (list, tuple)) and tree and all(isinstance(item, (str, bytes))
                                                        for item in tree):
        return len(tree)
    return None


def check_split_rows(group: int, rows: int, chunk_rows: Sequence[int | None], what: str) -> None:
    """A ``split_fn`` must put every row of a group into one chunk: the chunks' rows (``what``:
    their inputs' rows, or the rows their encoder returned) must add up to the group's. Checked
    where every chunk's rows are known; a chunk of uncountable rows leaves it to after pass 1.
    (A row dropped and another duplicated, or rows reordered, keep the sum: that is not seen.)"""
    if any(count is None for count in chunk_rows):
        return
    total = sum(count for count in chunk_rows if count is not None)
    if total != rows:
        listing = " + ".join(str(count) for count in chunk_rows)
        raise GradCacheError(
            f"split_fn cut {where(group)} of {rows} rows into chunks of {listing} = {total} "
            f"{what}; it must put every row of the group into exactly one chunk, in order (the "
            f"loss would see {total} rows of {rows})")


def plan_groups(backend: Backend, encoders: Any, inputs: Any, chunk_size: Any, *,
                get_rep: Any = None, split_fn: Callable | None = None,
                pad_trim: bool = False) -> list[GroupPlan]:
    """Validates the arguments of a step and plans its chunks; raises before anything runs.

    With ``pad_trim``, a group with an attention mask is cut into its chunks here, each trimmed
    to the columns its rows use (chunks of different shapes then run in a Python loop).
    """
    if isinstance(inputs, Mapping) or not isinstance(inputs, (list, tuple)):
        raise GradCacheError(
            f"inputs must be a list or tuple of input groups, e.g. (queries, passages); got "
            f"{type(inputs).__name__}. For a single group pass (x,)")
    if len(inputs) == 0:
        raise GradCacheError("inputs is empty: pass at least one input group")
    num_groups = len(inputs)
    encoder_list = _per_group(encoders, num_groups, "encoders", callable)
    for index, encoder in enumerate(encoder_list):
        if not callable(encoder):
            raise GradCacheError(f"encoder for {where(index)} is not callable: {encoder!r}")
    sizes = _per_group(chunk_size, num_groups, "chunk sizes",
                       lambda v: not isinstance(v, (list, tuple)))
    sizes = [_as_chunk_size(size, index) for index, size in enumerate(sizes)]
    get_reps = _per_group(get_rep, num_groups, "get_rep functions",
                          lambda v: v is None or callable(v))
    for index, pick in enumerate(get_reps):
        if pick is not None and not callable(pick):
            raise GradCacheError(f"get_rep for {where(index)} must be callable or None, got {pick!r}")
    groups = []
    for index, (encoder, group_inputs, size, pick) in enumerate(
            zip(encoder_list, inputs, sizes, get_reps)):
        takes_inputs = pick is not None and _takes_inputs(pick)
        pick = pick or _identity
        if split_fn is not None:
            chunks = list(split_fn(group_inputs, size))
            if not chunks:
                raise GradCacheError(f"split_fn returned no chunks for {where(index)}")
            rows = countable_rows(backend, group_inputs)
            if rows is not None:
                check_split_rows(index, rows, [countable_rows(backend, chunk) for chunk in chunks],
                                 "rows")
            groups.append(GroupPlan(index, encoder, group_inputs, None, pick, pre_split=chunks,
                                    rep_takes_inputs=takes_inputs, rows=rows))
            continue
        batch = group_batch_size(backend, group_inputs, index)
        plan = ChunkPlan.uniform(batch, size)
        trimmed = _padding.trimmed_chunks(backend, group_inputs, plan.bounds, index) \
            if pad_trim else None
        groups.append(GroupPlan(index, encoder, group_inputs, plan, pick, pre_split=trimmed,
                                rep_takes_inputs=takes_inputs))
    for group in groups:
        group.frozen = not backend.trains(group.encoder)
    last_group_of = {id(group.encoder): group.index for group in groups if not group.frozen}
    for group in groups:
        group.last_for_encoder = last_group_of.get(id(group.encoder)) == group.index
    return groups


class _Progress:
    """A tqdm bar over the chunks of both passes, or nothing."""

    def __init__(self, enabled: bool, total: int):
        self.bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                raise GradCacheError("progress=True needs tqdm: pip install 'gradient-cache[progress]'") from None
            self.bar = tqdm(total=total, desc="gradcache", unit="chunk", leave=False)

    def update(self, description: str) -> None:
        if self.bar is not None:
            self.bar.set_description(description, refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


@dataclass
class CachedForward:
    """What the first half of a step (pass 1 and the loss) leaves for the second (pass 2).

    :func:`cached_forward` builds it; :func:`cached_backward` consumes it, once. Between the two
    the encoders' activations are gone -- but for the one chunk whose graph a backend may keep
    (``kept``: :meth:`gradcache.Backend.encode_keeping_graph`) -- and only the representations'
    gradients (``rep_grads``, this rank's rows, already times the collective's ``grad_scale``),
    the random-state records of every chunk, and -- for ``check_determinism`` -- the
    representations themselves are held. A
    framework-driven backward pass (a torch ``autograd.Function``, a JAX ``custom_vjp``, a TF
    ``custom_gradient``) keeps this object from its forward to its backward and passes the
    incoming gradient of the loss as ``upstream``.

    Attributes:
        loss: the loss of the (global) batch, with no graph attached.
        grads: the backend's gradient accumulator after the loss (loss-owned parameters' share).
        rep_grads: ``dloss/dreps``, one nested gradient per input group.
    """

    backend: Backend
    groups: list[GroupPlan]
    reps: list
    records: list[ChunkItems]
    rep_grads: list
    loss: Any
    grads: Any
    check_determinism: bool
    determinism_tolerance: float
    rendezvous: Rendezvous
    bar: _Progress
    consumed: bool = False
    kept: KeptGraph | None = None

    def close(self) -> None:
        """Releases what the forward holds for the backward (progress bar and the kept graph
        included); the state can then no longer be pulled back. Idempotent."""
        self.bar.close()
        self.consumed = True
        self.reps, self.records, self.rep_grads = [], [], []
        self.kept = None


def run_cached_step(backend: Backend, encoders: Any, inputs: Sequence, loss_fn: Callable, *,
                    chunk_size: int | Sequence[int], get_rep: Any = None,
                    loss_kwargs: Mapping | None = None, split_fn: Callable | None = None,
                    pad_trim: bool = False, sort_by_length: bool = False,
                    check_finite: bool = False, check_determinism: bool = False,
                    determinism_tolerance: float = 1e-5, progress: bool = False,
                    collective: Collective | None = None) -> tuple[Any, Any]:
    """Runs one gradient-cached step on ``backend``; returns ``(loss, grads)``.

    This is what every adapter's ``cached_step`` calls after building its backend: both halves of
    the schedule (:func:`cached_forward`, then :func:`cached_backward`) inside the backend's
    transaction. ``grads`` is the backend's accumulator (``None`` for torch, whose gradients land
    in ``.grad``).

    With a ``collective`` the step is one rank's part of a distributed step: the loss sees every
    rank's representations concatenated in rank order (or, if it ``gathers_itself``, this rank's,
    and communicates on its own), and this rank pulls back the gradient of its own rows, times the
    collective's ``grad_scale``. Ranks may hold different numbers of rows and chunks.

    >>> import numpy as np
    >>> from gradcache.testing import NumpyBackend, LinearEncoder, NumpyInfoNCE
    >>> rng = np.random.default_rng(0)
    >>> encoder = LinearEncoder(rng.normal(size=(5, 3)))
    >>> queries, passages = rng.normal(size=(8, 5)), rng.normal(size=(8, 5))
    >>> loss, grads = run_cached_step(NumpyBackend(), encoder, (queries, passages), NumpyInfoNCE(),
    ...                               chunk_size=3)
    >>> grads[id(encoder)]["weight"].shape
    (5, 3)
    """
    with backend.transaction():
        forward = cached_forward(
            backend, encoders, inputs, loss_fn, chunk_size=chunk_size, get_rep=get_rep,
            loss_kwargs=loss_kwargs, split_fn=split_fn, pad_trim=pad_trim,
            sort_by_length=sort_by_length, check_finite=check_finite,
            check_determinism=check_determinism, determinism_tolerance=determinism_tolerance,
            progress=progress, collective=collective)
        grads = cached_backward(forward)
    return forward.loss, grads


def cached_forward(backend: Backend, encoders: Any, inputs: Sequence, loss_fn: Callable, *,
                   chunk_size: int | Sequence[int], get_rep: Any = None,
                   loss_kwargs: Mapping | None = None, split_fn: Callable | None = None,
                   pad_trim: bool = False, sort_by_length: bool = False,
                   check_finite: bool = False, check_determinism: bool = False,
                   determinism_tolerance: float = 1e-5, progress: bool = False,
                   collective: Collective | None = None,
                   differentiate: bool = True) -> CachedForward:
    """The first half of a step: plan, pass 1, the loss and its gradient with respect to the reps.

    Validates every argument before anything runs, encodes every chunk without a graph (recording
    its random state; the first chunk pass 2 pulls back with its graph where the backend keeps it),
    takes the loss (on the global batch, with a ``collective``) and
    ``dloss/dreps``, and runs ``check_finite``. Gradients of loss-owned parameters go into the
    accumulator here. Run it inside ``backend.transaction()`` when the backend writes gradients in
    place. The arguments are :func:`run_cached_step`'s, and ``differentiate``: when false (an
    evaluation loop, ``torch.no_grad()``), only the loss is taken -- no gradient of any kind is
    computed or written -- and the forward cannot be pulled back.

    >>> import numpy as np
    >>> from gradcache.testing import NumpyBackend, LinearEncoder, NumpyInfoNCE
    >>> rng = np.random.default_rng(0)
    >>> encoder = LinearEncoder(rng.normal(size=(5, 3)))
    >>> batch = (rng.normal(size=(8, 5)), rng.normal(size=(8, 5)))
    >>> forward = cached_forward(NumpyBackend(), encoder, batch, NumpyInfoNCE(), chunk_size=3)
    >>> [grad.shape for grad in forward.rep_grads]
    [(8, 3), (8, 3)]
    >>> grads = cached_backward(forward, upstream=0.5)   # the gradients of 0.5 * loss
    """
    rendezvous = Rendezvous(collective, planned=1)
    try:
        # the adapters parse their keywords with StepOptions already; a backend of one's own
        # calling the core directly gets the same checks
        StepOptions(get_rep=get_rep, loss_kwargs=loss_kwargs, split_fn=split_fn,
                    pad_trim=pad_trim, sort_by_length=sort_by_length, check_finite=check_finite,
                    check_determinism=check_determinism,
                    determinism_tolerance=determinism_tolerance, progress=progress)
        check_loss_fn(loss_fn)
        if sort_by_length:
            if collective is not None:
                raise GradCacheError(
                    "sort_by_length is not supported in a distributed step: the loss sees the "
                    "global batch, and each rank's sorting is its own")
            if split_fn is None and isinstance(inputs, (list, tuple)):
                # the permutation is taken from the mask: every leaf must have its rows first
                for index, group_inputs in enumerate(inputs):
                    group_batch_size(backend, group_inputs, index)
                inputs, loss_fn = _padding.sort_groups(backend, inputs, loss_fn)
        groups = plan_groups(backend, encoders, inputs, chunk_size, get_rep=get_rep,
                             split_fn=split_fn, pad_trim=pad_trim)
    except BaseException as error:   # one rank's bad input must not leave the others waiting
        rendezvous.fail(error)
        raise
    # the ranks meet after pass 1 (to gather) and after pass 2 (so that none applies gradients
    # while another raises); with encoders that communicate in every call, also before pass 1
    rendezvous.planned = 2
    if rendezvous.active and collective is not None and collective.same_chunk_counts:
        rendezvous.planned += 1
        _agree_chunk_counts(rendezvous, groups)
    checked_loss = CheckedLoss(backend, loss_fn, loss_kwargs, collective)
    if checked_loss.gathers_itself and collective is None:
        raise GradCacheError(
            "this loss gathers every rank's rows itself and returns the gradient of the global "
            "loss, so it needs a distributed step: pass distributed=... (without it, averaging "
            "wrappers would leave the gradients a factor world-size too small)")
    track = progress and backend.progress_enabled() and values_known(backend, inputs)
    total = sum((1 if g.frozen or not differentiate else 2) * g.num_chunks for g in groups)
    bar = _Progress(track, total)
    # The first chunk pass 2 pulls back may keep its graph from pass 1 (saving its re-encoding;
    # pass 2 pulls it back first, so no other graph is held beside it). Not for an evaluation
    # (nothing is pulled back) nor with check_determinism (it would compare the chunk with itself).
    trained = [group.index for group in groups if not group.frozen]
    kept = KeptGraph(trained[0]) if differentiate and trained and not check_determinism else None
    try:
        reps, records = [], []
        for group in groups:
            rep, record = _pass_one(backend, group, bar, kept)
            reps.append(rep)
            records.append(record)
        # after pass 1: lazily built layers (Keras) have made their variables by now
        rep_grads: list
        if not differentiate:
            loss, rep_grads, grads = _loss_only(backend, collective, rendezvous, checked_loss,
                                                reps), [], None
        elif collective is None:
            loss, rep_grads, grads = loss_and_rep_grads(backend, checked_loss, reps,
                                                        backend.zero_grads())
        else:
            loss, rep_grads, grads = _distributed_loss(backend, collective, rendezvous,
                                                       checked_loss, reps, backend.zero_grads())
        if check_finite:
            backend.run_check(_require_finite(backend), loss)
    except BaseException as error:   # KeyboardInterrupt too: the others must not wait
        bar.close()
        if kept is not None:
            kept.rep = kept.intact = None   # the traceback holds this frame: let the graph go
        rendezvous.fail(error)
        raise
    forward = CachedForward(backend, groups, reps if check_determinism else [None] * len(reps),
                            records, rep_grads, loss, grads, check_determinism,
                            determinism_tolerance, rendezvous, bar,
                            kept=kept if kept is not None and kept.rep is not None else None)
    if not differentiate:
        forward.close()   # nothing to pull back: release the records at once
    return forward


def _loss_only(backend: Backend, collective: Collective | None, rendezvous: Rendezvous,
               checked_loss: CheckedLoss, reps: list) -> Any:
    """The loss of the (global) batch, with no gradient: an evaluation step."""
    if collective is not None:
        # no pass 2, so no meeting after it: this one is the last (known before it is reached)
        rendezvous.planned -= 1
        counts = _agreed_counts(backend, collective, rendezvous, reps)
        if not checked_loss.gathers_itself:
            reps = [_tree.map_leaves(lambda leaf, c=c: collective.all_gather_rows(leaf, c), rep,
                                     backend.is_leaf) for rep, c in zip(reps, counts)]
    return backend.detach(checked_loss(*reps))


def cached_backward(forward: CachedForward, upstream: Any = None) -> Any:
    """The second half of a step: pass 2, pulling ``upstream * dloss/dreps`` into the parameters.

    Each chunk is re-encoded with a graph under its replayed random state (the kept one, first,
    pulled back through its pass-1 graph instead) and the matching slice
    of the representations' gradient is pulled back into the gradient accumulator, which is
    returned. ``upstream`` is the gradient of whatever the caller differentiates with respect to
    the loss (a loss scale, ``1 / accumulation_steps``); ``None`` means 1. The loss-owned
    parameters' gradient that the first half left in the accumulator is scaled by ``upstream``
    too, so the result is the gradient of ``upstream * loss`` (a backend that writes the
    loss-owned gradient in place at the loss, such as torch's ``cached_step``, must defer it to
    the accumulator for this to hold). A group whose encoder has nothing to train is skipped.
    Every rank of a distributed step then meets the last time. A forward can be pulled back
    once; a second call raises :class:`GradCacheError`.
    """
    if forward.consumed:
        raise GradCacheError(
            "this cached forward was already pulled back (or released, or taken without "
            "gradients): pass 2 runs once per forward; run the forward again for another backward")
    forward.consumed = True
    backend = forward.backend
    rep_grads, grads = forward.rep_grads, forward.grads
    # everything from here inside the try: a bad upstream, a failing scale, a failing chunk all
    # release what the forward holds (the kept graph too) and tell the other ranks
    try:
        if upstream is not None:
            _check_scalar_upstream(backend, upstream)

            def scaled(tree: Any) -> Any:
                return _tree.map_leaves(lambda leaf: backend.multiply(leaf, upstream), tree,
                                        backend.is_leaf)
            rep_grads, grads = [scaled(grad) for grad in rep_grads], scaled(grads)
        for group, rep, rep_grad, record in zip(forward.groups, forward.reps, rep_grads,
                                                forward.records):
            if group.frozen:
                continue
            grads = _pass_two(backend, group, rep, rep_grad, record, grads,
                              forward.determinism_tolerance, forward.bar, forward)
        forward.rendezvous.agree("after pass 2")
    except BaseException as error:
        forward.rendezvous.fail(error)
        raise
    finally:
        forward.close()
    return grads


def _check_scalar_upstream(backend: Backend, upstream: Any) -> None:
    """The gradient flowing into a scalar loss is a scalar: anything else would broadcast."""
    if backend.is_leaf(upstream):
        shape = tuple(backend.shape(upstream))
        if shape != ():
            raise GradCacheError(f"upstream must be a scalar (the gradient of a scalar loss), got "
                                 f"a tensor of shape {shape}")
        return
    if isinstance(upstream, bool) or not isinstance(upstream, numbers.Number) \
            or isinstance(upstream, complex):
        raise GradCacheError(f"upstream must be a real number or a scalar {backend.name} tensor, "
                             f"got {upstream!r}")


def _agree_chunk_counts(rendezvous: Rendezvous, groups: list[GroupPlan]) -> None:
    """Raises on every rank, before anything runs, if the ranks would encode unequal numbers of chunks."""
    counts = [g.num_chunks for g in groups]
    reports = rendezvous.agree("before pass 1", counts)
    if any(report != counts for report in reports):
        listing = ", ".join(f"rank {rank}: {report}" for rank, report in enumerate(reports))
        raise GradCacheError(
            f"the encoders communicate in every call, so every rank must run the same number of "
            f"chunks per input group; got {listing}. Give every rank the same local batch size, or "
            f"chunk sizes that cut every rank's rows into as many chunks")


def _rep_signature(backend: Backend, rep: Any) -> tuple[int | None, Any, tuple]:
    """``(rows, leaf paths, per-leaf (trailing shape, dtype))`` of one group's representation
    (paths, not the structure's repr: non-tensor leaves may differ between ranks harmlessly)."""
    leaves, spec = _tree.flatten(rep, backend.is_leaf)
    rows = backend.batch_size(leaves[0])
    return rows, tuple(_tree.leaf_paths(spec)), tuple(
        (tuple(backend.shape(leaf))[1:], str(getattr(leaf, "dtype", ""))) for leaf in leaves)


def _agreed_counts(backend: Backend, collective: Collective, rendezvous: Rendezvous,
                   reps: list) -> list[Any]:
    """Rows per rank for every group, after checking that the ranks' representations fit together
    (SPMD engines: whatever their collective's ``row_counts`` says, checked by the engine)."""
    mine = [_rep_signature(backend, rep) for rep in reps]
    reports = rendezvous.agree("after pass 1", mine)
    if not rendezvous.active:  # SPMD: one program; the collective knows the other ranks' rows
        return [collective.row_counts(signature[0]) for signature in mine]
    signatures = mine
    for rank, other in enumerate(reports):
        if len(other) != len(signatures):
            raise GradCacheError(
                f"rank {rank} runs {len(other)} input groups, this rank {len(signatures)}; every "
                f"rank must run the same step")
        for index, (theirs, ours) in enumerate(zip(other, signatures)):
            if theirs[1:] != ours[1:]:
                raise GradCacheError(
                    f"the representations of {where(index)} differ between ranks beyond the number of "
                    f"rows: rank {rank} has {theirs[1:]}, this rank {ours[1:]}")
    return [[other[index][0] for other in reports] for index in range(len(signatures))]


def _distributed_loss(backend: Backend, collective: Collective, rendezvous: Rendezvous,
                      checked_loss: CheckedLoss, reps: list, grads: Any) -> tuple[Any, list, Any]:
    """The global-batch loss and this rank's share of its representation gradients."""
    counts = _agreed_counts(backend, collective, rendezvous, reps)
    if checked_loss.gathers_itself:
        loss, rep_grads, grads = loss_and_rep_grads(backend, checked_loss, reps, grads)
    else:
        gathered = [_tree.map_leaves(lambda leaf, c=c: collective.all_gather_rows(leaf, c), rep,
                                     backend.is_leaf) for rep, c in zip(reps, counts)]
        loss, global_grads, grads = loss_and_rep_grads(backend, checked_loss, gathered, grads)
        rep_grads = [_tree.map_leaves(lambda leaf, c=c: collective.local_rows(leaf, c), grad,
                                      backend.is_leaf) for grad, c in zip(global_grads, counts)]
    if collective.grad_scale != 1:
        rep_grads = [_tree.map_leaves(lambda leaf: leaf * collective.grad_scale, grad,
                                      backend.is_leaf) for grad in rep_grads]
    return loss, rep_grads, grads


def check_loss_fn(loss_fn: Any) -> None:
    """``loss_fn`` must be callable, or supply its own gradient (``value_and_grad``); checked
    before pass 1, which would otherwise run in vain.

    A wrapper an adapter puts around the user's loss (JAX's ``loss_takes_params``) names what it
    wraps as ``__wrapped__``, so that the user's own value is the one checked.
    """
    wrapped = loss_fn
    if inspect.isfunction(loss_fn) and "__wrapped__" in vars(loss_fn):
        wrapped = vars(loss_fn)["__wrapped__"]   # one level: the adapter's own wrapper
    if not callable(wrapped) and not callable(getattr(wrapped, "value_and_grad", None)):
        raise GradCacheError(
            f"loss_fn must be callable, loss_fn(*reps, **loss_kwargs) -> scalar (or have a "
            f"value_and_grad(*reps, **loss_kwargs) -> (loss, rep_grads)); got {wrapped!r}")


class CheckedLoss:
    """Calls the user's loss with its keyword arguments and checks that it returned a scalar.

    A loss that supplies its own gradient (``value_and_grad(*reps) -> (loss, rep_grads)``, as the
    tiled losses and the numpy test backend's losses do) keeps that ability through this wrapper;
    :attr:`supplies_gradient` tells the core to call it instead of differentiating. An error the
    loss raises keeps its type and gets a note saying that it came from the loss, on which batch,
    and the shapes of the representations and of ``loss_kwargs`` (a per-row keyword argument of
    the wrong length shows there). Under a trace (``jax.jit``, ``tf.function``) the loss runs, and
    the note is added, when the step is traced.
    """

    def __init__(self, backend: Backend, loss_fn: Callable, loss_kwargs: Mapping | None,
                 collective: Collective | None = None):
        self.backend = backend
        # Any: a loss may carry attributes (value_and_grad, gathers_itself) no Callable declares
        self.loss_fn: Any = loss_fn
        self.loss_kwargs = dict(loss_kwargs or {})
        if collective is None:
            self.batch = "the full batch"
        elif self.gathers_itself:
            self.batch = "this rank's rows (the loss gathers the other ranks' itself)"
        else:
            self.batch = "the global batch (every rank's rows)"

    @property
    def supplies_gradient(self) -> bool:
        return callable(getattr(self.loss_fn, "value_and_grad", None))

    @property
    def gathers_itself(self) -> bool:
        """The loss takes each rank's own representations and communicates on its own (the
        distributed tiled losses); a distributed step then gathers nothing for it."""
        return bool(getattr(self.loss_fn, "gathers_itself", False))

    def __call__(self, *reps: Any) -> Any:
        try:
            loss = self.loss_fn(*reps, **self.loss_kwargs)
        except Exception as error:
            self._note(error, reps)
            raise
        return self._check(loss)

    def value_and_grad(self, *reps: Any) -> tuple[Any, Any]:
        try:
            loss, rep_grads = self.loss_fn.value_and_grad(*reps, **self.loss_kwargs)
        except Exception as error:
            self._note(error, reps)
            raise
        return self._check(loss), rep_grads

    def _note(self, error: BaseException, reps: tuple) -> None:
        text = f"gradcache: raised in loss_fn on {self.batch}"
        backend = self.backend
        try:
            def shapes(tree: Any) -> str:
                if backend.is_leaf(tree):
                    return str(tuple(backend.shape(tree)))
                return f"{{{describe_shapes(backend, tree)}}}"
            groups = ", ".join(f"{where(index)} {shapes(rep)}" for index, rep in enumerate(reps))
            text += f", with representations of {groups}"
            kwargs = {key: value for key, value in self.loss_kwargs.items()
                      if _tree.flatten(value, backend.is_leaf)[0]}
            if kwargs:
                text += f" and loss_kwargs {describe_shapes(backend, kwargs)}"
        except Exception:   # the shapes are a courtesy: never hide the loss's own error
            pass
        add_location_note(error, text)

    def _check(self, loss: Any) -> Any:
        backend = self.backend
        if not backend.is_leaf(loss):
            raise GradCacheError(
                f"loss_fn must return a scalar {backend.name} tensor, got {type(loss).__name__}")
        shape = tuple(backend.shape(loss))
        if shape != ():
            raise GradCacheError(f"loss_fn must return a scalar, got a tensor of shape {shape}")
        return loss


def _check_rep(backend: Backend, group: int, chunk: Any, rep: Any, rows: int | None,
               inputs: Any) -> None:
    leaves, spec = _tree.flatten(rep, backend.is_leaf)
    if not leaves:
        raise GradCacheError(
            f"the encoder returned no {backend.name} tensor for {where(group, chunk)} (got "
            f"{type(rep).__name__}); use get_rep to pick the representation from the output")
    for path, leaf in zip(_tree.leaf_paths(spec), leaves):
        size = backend.batch_size(leaf)
        if rows is not None and size is not None and size != rows:
            raise GradCacheError(
                f"representation '{path}' for {where(group, chunk)} has shape "
                f"{tuple(backend.shape(leaf))}, but the chunk has {rows} rows "
                f"({describe_shapes(backend, inputs)}); an encoder must return one row per input row")


def _chunk_rows(backend: Backend, chunk: Any) -> int | None:
    leaves, _ = _tree.flatten(chunk, backend.is_leaf)
    return backend.batch_size(leaves[0]) if leaves else None


def _pass_one(backend: Backend, group: GroupPlan, bar: _Progress,
              kept: KeptGraph | None = None) -> tuple[Any, ChunkItems]:
    def body(carry: Any, chunk: Chunk, rows: Any, item: Any) -> tuple[Any, tuple[Any, Any]]:
        inputs = item if group.pre_split is not None else rows
        try:
            record = backend.rng_capture(group.index, chunk.index)
            rep = None
            if kept is not None and kept.holds(group.index, chunk):
                answer = backend.encode_keeping_graph(group.encoder, inputs, record,
                                                      group.picker(inputs))
                if answer is not None:
                    kept.rep, kept.intact = answer
                    answer = None   # the kept graph lives in `kept` only (a traceback holds this frame)
                    rep = _tree.map_leaves(backend.detach, kept.rep, backend.is_leaf)
            if rep is None:
                rep = backend.encode(group.encoder, inputs, record, group.picker(inputs))
        except GradCacheError as error:
            raise GradCacheError(f"{where(group.index, chunk.label, 'pass 1')}: {error}") from None
        except Exception as error:
            add_location_note(error, f"gradcache: raised while encoding {where(group.index, chunk.label, 'pass 1')}"
                                     f" with inputs {describe_shapes(backend, inputs)}")
            raise
        _check_rep(backend, group.index, chunk.label, rep, _chunk_rows(backend, inputs), inputs)
        bar.update(f"gradcache pass 1, group {group.index}")
        if group.pre_split is not None:
            leaves, _ = _tree.flatten(rep, backend.is_leaf)
            return carry, (rep, (record, backend.batch_size(leaves[0])))
        return carry, (rep, record)

    if group.pre_split is not None:
        # a split_fn's chunks (or pad_trim's) have their own shapes: one by one, and the plan is
        # known once each has run
        try:
            _, rep, items = run_chunks(backend, body, None, None,
                                       ChunkPlan((0,) * len(group.pre_split)),
                                       group=group.index, items=ChunkItems.one_by_one(group.pre_split))
        except Exception as error:
            if group.plan is not None:   # the chunks are pad_trim's, cut to different lengths
                add_location_note(error, f"gradcache: pad_trim cut the chunks of {where(group.index)} "
                                         f"to different lengths; per-token representations cannot "
                                         f"be joined then: pool them in get_rep, or drop pad_trim")
            raise
        group.plan = ChunkPlan(tuple(rows for _, rows in items.single))
        if group.rows is not None:   # chunks whose rows could not be counted before they ran
            check_split_rows(group.index, group.rows, group.plan.sizes,
                             "rows of representations")
        return rep, ChunkItems.one_by_one([record for record, _ in items.single])
    loop = loop_length(backend, group.planned, group.last_for_encoder)
    _, rep, records = run_chunks(backend, body, None, group.inputs, group.planned,
                                 group=group.index, loop=loop)
    return rep, records


def _pass_two(backend: Backend, group: GroupPlan, rep: Any, rep_grad: Any, records: ChunkItems,
              grads: Any, tolerance: float, bar: _Progress, forward: CachedForward) -> Any:
    def body(grads: Any, chunk: Chunk, rows: Any, item: Any) -> tuple[Any, tuple[Any, Any]]:
        inputs, grad_chunk, rep_chunk = rows
        if group.pre_split is not None:
            inputs, record = item
        else:
            record = item
        # a plain bool: the core runs a group's last chunk by itself when the backend reads this
        final_use = group.last_for_encoder and chunk.last
        encoder, get_rep = group.encoder, group.picker(inputs)
        kept = forward.kept
        if kept is not None and kept.holds(group.index, chunk):
            kept_rep, intact = kept.rep, kept.intact
            kept.rep = kept.intact = forward.kept = None   # the graph goes with this backward
            # pass 1 kept this chunk's graph: pull back through it instead of re-encoding -- unless
            # the backend says it is spoilt (then re-encoded, as without it)
            if intact is None or intact():
                encoder, get_rep = _KeptOutput(kept_rep), _identity
            del kept_rep, intact
        try:
            grads, recomputed = pullback(backend, encoder, inputs, record, get_rep, grad_chunk,
                                         grads, final_use=final_use)
        except GradCacheError as error:
            raise GradCacheError(f"{where(group.index, chunk.label, 'pass 2')}: {error}") from None
        except Exception as error:
            add_location_note(error, f"gradcache: raised while re-encoding {where(group.index, chunk.label, 'pass 2')}"
                                     f" with inputs {describe_shapes(backend, inputs)}")
            raise
        if rep_chunk is not None:
            # through run_check: under a compiled loop the values (and the index) are not concrete
            backend.run_check(
                lambda index, first, second: _check_same(backend, group.index, index, first,
                                                         second, tolerance),
                chunk.index, rep_chunk, recomputed)
        bar.update(f"gradcache pass 2, group {group.index}")
        return grads, (None, None)

    if group.pre_split is not None:
        items = ChunkItems.one_by_one(list(zip(group.pre_split, records.single)))
        grads, _, _ = run_chunks(backend, body, grads, (None, rep_grad, rep), group.planned,
                                 group=group.index, items=items)
        return grads
    grads, _, _ = run_chunks(backend, body, grads, (group.inputs, rep_grad, rep), group.planned,
                             group=group.index, items=records)
    return grads


def host_float(backend: Backend, value: Any) -> np.ndarray:
    """A tensor's values as float64 numpy (the checks compare on the host, in one precision)."""
    host = backend.to_host(value)
    if host is None:
        raise GradCacheError(f"the {backend.name} backend could not read a value on the host")
    return np.asarray(host).astype(np.float64)


def _require_finite(backend: Backend) -> Callable[[Any], None]:
    def check(loss: Any) -> None:
        if not np.all(np.isfinite(host_float(backend, loss))):
            raise GradCacheError(f"the loss is not finite ({loss}); no gradient was applied")
    return check


def _check_same(backend: Backend, group: int, chunk: Any, first: Any, second: Any,
                tolerance: float) -> None:
    first_leaves, spec = _tree.flatten(first, backend.is_leaf)
    second_leaves, _ = _tree.flatten(second, backend.is_leaf)
    for path, a, b in zip(_tree.leaf_paths(spec), first_leaves, second_leaves):
        first_values, second_values = host_float(backend, a), host_float(backend, b)
        diff = float(np.max(np.abs(first_values - second_values), initial=0.0))
        scale = max(1.0, float(np.max(np.abs(first_values), initial=0.0)))
        if not diff <= tolerance * scale:
            raise GradCacheError(
                f"{where(group, chunk, 'pass 2')}: representation '{path}' recomputed in pass 2 "
                f"differs from pass 1 by {diff:.3g} (tolerance {tolerance:g} x {scale:.3g}); the "
                f"encoder uses randomness the replay does not reproduce, or is not deterministic")
