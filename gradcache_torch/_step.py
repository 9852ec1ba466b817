"""``cached_step`` for PyTorch: the public entry point, in the idiom of ``loss.backward()``.

It builds a :class:`TorchBackend` for the step and runs the core's schedule; parameter gradients
accumulate into ``.grad`` exactly as a full-batch ``loss.backward()`` would put them there.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from gradcache import (
    Collective,
    GradCacheError,
    Rendezvous,
    StepOptions,
    cached_backward,
    cached_forward,
)
from gradcache_torch._backend import (
    TorchBackend,
    _RefuseBackward,
    check_keep_first_graph,
    is_sentence_transformer,
    trained_parameters,
)
from gradcache_torch._distributed import (
    GradientSync,
    TorchCollective,
    broadcast_buffers,
    fsdp_units,
    is_ddp,
    resolve_group,
)

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from gradcache import StepKeywords


def cached_step(encoders: Any, inputs: Sequence, loss_fn: Callable, *,
                chunk_size: int | Sequence[int], scaler: Any = None,
                keep_first_graph: bool = True,
                **options: Unpack[StepKeywords]) -> torch.Tensor:
    """One contrastive step over a batch larger than memory; gradients land in ``.grad``.

    Equivalent to ``loss_fn(*[get_rep(enc(x)) for enc, x in zip(encoders, inputs)]).backward()`` on
    the full batch -- same gradients, same random masks as a chunk-by-chunk forward -- while holding
    only one chunk's activations at a time.

    Args:
        encoders: one module or callable shared by every input group, or a sequence with one per
            group. Chunks are passed as ``enc(x)`` for a tensor, ``enc(**x)`` for a mapping
            (a Hugging Face ``BatchEncoding``), ``enc(*x)`` for a list or tuple.
        inputs: a sequence of input groups, e.g. ``(queries, passages)``. Every tensor leaf of a group
            is batched along dimension 0; groups may differ in size (``k`` passages per query).
        loss_fn: ``loss_fn(*reps, **loss_kwargs)`` returning a scalar; ``reps`` has one entry per
            group, with the structure the encoder returned. Parameters the loss owns (a learnable
            temperature) get their gradient exactly once.
        chunk_size: rows per chunk, one int or one per group. It bounds memory; it never changes
            the gradients.
        get_rep: picks the representation from an encoder's output (one callable or one per group).
        loss_kwargs: extra keyword arguments for the loss (labels, masks).
        split_fn: ``split_fn(group_input, chunk_size) -> list of chunks`` for inputs the core cannot
            slice (raw strings, custom batch objects).
        scaler: a ``torch.amp.GradScaler``; gradients are scaled as by
            ``scaler.scale(loss).backward()``. Call ``scaler.step``/``scaler.update`` as usual.
        keep_first_graph: encode the first chunk pass 2 pulls back once, keeping its graph from
            pass 1 (default; docs/torch.md "The first chunk is encoded once"). ``False``
            re-encodes it as every other chunk: for an encoder whose backward reads state that a
            later forward overwrites outside autograd's saved tensors (CUDA-graphed modules from
            ``torch.cuda.make_graphed_callables``, custom Functions keeping buffers on ``ctx``),
            or to keep that chunk's activations out of the loss's peak memory.
        pad_trim: for mapping inputs with an ``attention_mask``, cut each chunk to its longest row.
        sort_by_length: form chunks from length-sorted rows (mapping inputs with an
            ``attention_mask``), so that ``pad_trim`` removes most padding; the loss still sees
            every group in the caller's order. Dropout masks then fall on other rows than without
            sorting (an equally valid draw); deterministic encoders get the same gradients.
        check_finite: raise (and roll back) if the loss is NaN or infinite.
        check_determinism: compare pass 2's representations with pass 1's and raise if they differ
            by more than ``determinism_tolerance`` (relative to their magnitude).
        progress: a tqdm bar over the chunks of both passes.
        distributed: ``True`` (the default process group), a ``ProcessGroup``, or a
            :class:`gradcache_torch.TorchCollective` (to read its byte count), or any other
            :class:`gradcache.Collective` (then each rank's ``.grad`` gets its own rows' share and
            reducing it is yours -- a loss-owned parameter's is the global one on every rank; DDP's
            hooks are still bypassed): this call is one
            rank's part of a step over the *global* batch. Every rank's representations are
            gathered after pass 1 (rank order), ``loss_fn`` sees the global batch (or, for a loss
            that ``gathers_itself`` such as :func:`gradcache_torch.losses.across_ranks`, this rank's
            rows), and each rank pulls back the gradient of its own rows. Afterwards every rank
            holds the global loss and the gradients of one process running the whole global
            batch: FSDP2 reduce-scatters once per unit per step; DDP's hooks are bypassed and what
            the step adds to DDP and unwrapped modules is averaged by bucketed all-reduces after
            the ranks' last agreement (DDP's averaging, done once; unused parameters are fine).
            Local batches may differ in size and in number of chunks (FSDP2 aside); a rank that
            fails (any exception, ``KeyboardInterrupt`` included) makes every rank raise, with
            every ``.grad`` as it was, also if a rank dies during the final average.
            Per-row ``loss_kwargs`` must be global (see :func:`gradcache_torch.all_gather_rows`).
            Not given (or ``None``): each rank's loss sees its own rows; DDP-wrapped encoders on
            an initialised process group bypass DDP's hooks, the ranks meet once after pass 2 (so
            that a rank failing mid-step stops every rank at once rather than at the process
            group's timeout) and DDP's average is taken afterwards -- except under
            ``no_sync()``, with a comm hook registered, or with ``distributed=False``, which keep
            DDP's own reduction in the last chunk.

    Returns:
        The loss, detached.

    Raises:
        GradCacheError: for malformed input (before anything runs), a call under
            ``torch.no_grad()``/``torch.inference_mode()`` (use :func:`gradcache_torch.cached_loss`
            for an evaluation loss), a loss or an encoder that calls ``backward()`` itself, a
            call inside the loss of another step, a loss that reads no representation, or a
            failed check.
            Any error (a ``KeyboardInterrupt`` too) leaves every ``.grad`` exactly as it was before
            the call, in place: the same tensor objects with the same values.

    >>> import torch
    >>> from gradcache_torch import cached_step
    >>> encoder = torch.nn.Linear(8, 4)
    >>> queries, passages = torch.randn(16, 8), torch.randn(16, 8)
    >>> def info_nce(q, p):
    ...     return torch.nn.functional.cross_entropy(q @ p.T, torch.arange(len(q)))
    >>> loss = cached_step(encoder, (queries, passages), info_nce, chunk_size=4)
    >>> encoder.weight.grad.shape
    torch.Size([4, 8])
    """
    def refuse_early() -> None:
        if not torch.is_grad_enabled():
            # an evaluation between steps (a trainer's eval loop) would add its batch's gradient
            # to the next step: refuse before anything runs
            context = ("torch.inference_mode()" if torch.is_inference_mode_enabled()
                       else "torch.no_grad()")
            raise GradCacheError(
                f"cached_step ran under {context}: it writes gradients into .grad, which "
                f"gradients off cannot mean; for an evaluation loss use "
                f"gradcache_torch.cached_loss (under {context} it computes the loss alone), or "
                f"call cached_step with gradients enabled")
        if scaler is not None and not callable(getattr(scaler, "scale", None)):
            raise GradCacheError(
                f"scaler must be a torch.amp.GradScaler (with scale()), got {scaler!r}")
        check_keep_first_graph(keep_first_graph)

    setup = _Setup(encoders, inputs, loss_fn, options, entry="cached_step", own=("scaler",),
                   checks=refuse_early)
    backend = TorchBackend(scaler=scaler, bypass_ddp=setup.bypass_ddp,
                           protect=trained_parameters(encoders, loss_fn),
                           keep_first_graph=keep_first_graph)
    sync = setup.gradient_sync()
    try:
        with backend.transaction():
            forward = cached_forward(backend, encoders, inputs, loss_fn, chunk_size=chunk_size,
                                     collective=setup.collective, **setup.keywords)
            cached_backward(forward)
            setup.commit(sync)   # the gradient average runs inside the rollback too
    except BaseException as error:
        setup.abort(error, sync)
        raise
    return forward.loss


class _Setup:
    """What ``cached_step`` and ``cached_loss`` make of their options, in one place: the shared
    options parsed and checked, a SentenceTransformer's default ``get_rep``, and for
    ``distributed=`` the collective (DDP's buffers broadcast now) and the averaging of the DDP and
    unwrapped modules' gradients, made by :meth:`gradient_sync` when the gradients are written.

    Without ``distributed=`` (not given, or ``None``), DDP-wrapped encoders on an initialised
    process group get the same protection against a failing rank (:func:`_ddp_agreement`): each
    rank's loss still sees its own rows, DDP's hooks are bypassed, the ranks meet once after pass 2
    and the DDP modules' gradients are averaged afterwards, as DDP would have averaged them."""

    def __init__(self, encoders: Any, inputs: Any, loss_fn: Any, options: Mapping[str, Any], *,
                 entry: str, own: Sequence[str] = (), differentiate: bool = True,
                 checks: Callable[[], None] | None = None):
        running = _RefuseBackward.running()
        if differentiate and running is not None:
            # the same code on every rank: nobody waits for this one
            raise GradCacheError(
                f"{entry} was called inside {running} of another gradient-cached step: its "
                f"pass 2 would write .grad outside that step's rollback; call it outside and "
                f"add the losses, or under torch.no_grad() for its value alone")
        try:
            if checks is not None:
                checks()
            step = StepOptions.from_keywords(options, adapter="gradcache_torch", own=own,
                                             entry=entry)
        except GradCacheError as error:
            _tell_other_ranks(encoders, loss_fn, options, error, differentiate)
            raise
        self.keywords = step.step_keywords()
        self.keywords["get_rep"] = _default_get_rep(encoders, inputs, step.get_rep)
        self.collective: Collective | None = None
        self._averaged: list = []
        #: the one agreement of a local-loss step under DDP (see :func:`_ddp_agreement`)
        self.agreement: Rendezvous | None = None
        if step.distributed is not False and step.distributed is not None:
            self.collective, self._averaged = _distribute(encoders, loss_fn, step.distributed)
        elif options.get("distributed") is None and differentiate:
            self.agreement, self._averaged = _ddp_agreement(encoders)
        #: the step averages DDP's gradients itself: its hooks are bypassed in every chunk
        self.bypass_ddp = self.collective is not None or self.agreement is not None

    def gradient_sync(self) -> GradientSync | None:
        """Sets the averaged modules' gradients aside now; ``finish`` or ``restore`` later."""
        return GradientSync(self._averaged) if self._averaged else None

    def commit(self, sync: GradientSync | None) -> None:
        """The end of a step that succeeded on this rank, inside its transaction: the agreement of
        a local step under DDP, then the gradient average (which raises with nothing written if a
        rank dies in it)."""
        if self.agreement is not None:
            self.agreement.agree("after pass 2")
        if sync is not None:
            sync.finish()

    def abort(self, error: BaseException, sync: GradientSync | None = None) -> None:
        """A step that failed on this rank: the other ranks are told (a local step under DDP;
        the core tells them in a distributed step) and the set-aside gradients are put back."""
        if self.agreement is not None:
            self.agreement.fail(error)
        if sync is not None:
            sync.restore()


def _tell_other_ranks(encoders: Any, loss_fn: Any, options: Mapping[str, Any],
                      error: BaseException, differentiate: bool) -> None:
    """A rank that refuses a step before it began (a bad option, gradients off) reports its
    error to the ranks that did begin it, which would otherwise wait for it at their first
    agreement until the process group's timeout (30 minutes by default).

    It takes the step's part up to that agreement -- the same buffer broadcasts, one step
    counted -- and reports there, as a rank failing later in the step does. Nothing is told where
    the step would have no agreement (``distributed=False``, no DDP, an evaluation under DDP) or
    where ``distributed=`` itself is malformed (then nobody knows the step's ranks)."""
    distributed = options.get("distributed")
    try:
        if distributed is None and differentiate:
            agreement, _ = _ddp_agreement(encoders)
        elif distributed is not None and distributed is not False:
            collective, _ = _distribute(encoders, loss_fn, distributed)
            agreement = Rendezvous(collective, planned=1)
        else:
            return
    except Exception:   # the error being raised says more than why the others were not told
        return
    if agreement is not None:
        agreement.fail(error)


def _sentence_embedding(output: Any) -> Any:
    return output["sentence_embedding"]


def _default_get_rep(encoders: Any, inputs: Any, get_rep: Any) -> Any:
    """``get_rep`` with ``output["sentence_embedding"]`` for the groups a SentenceTransformer
    encodes when the caller gave none; anything malformed is left for the core to report."""
    if get_rep is not None or not isinstance(inputs, (list, tuple)):
        return get_rep
    if isinstance(encoders, (list, tuple)):
        if len(encoders) != len(inputs):
            return get_rep
        listed = list(encoders)
    else:
        listed = [encoders] * len(inputs)
    if not any(is_sentence_transformer(encoder) for encoder in listed):
        return get_rep
    return [_sentence_embedding if is_sentence_transformer(encoder) else None
            for encoder in listed]


def _ddp_agreement(encoders: Any) -> tuple[Rendezvous | None, list]:
    """The agreement and the averaged ``(module, group, ignored names)`` of a step without
    ``distributed=`` whose encoders include DDP-wrapped modules; ``(None, [])`` where DDP's own
    reduction stays.

    DDP all-reduces in the backward of the last chunk: a rank that raised earlier would leave the
    others waiting there until the process group's timeout (30 minutes by default). Instead the
    step bypasses DDP's hooks, every rank meets once after pass 2 (a rank that failed reports its
    error there, so that every rank raises with every ``.grad`` as it was), and
    :class:`GradientSync` then averages what the step added to the DDP modules -- what DDP would
    have done, exact also when the last chunk leaves a parameter unused. DDP's own reduction is
    kept where bypassing it would change what the caller asked for: inside ``no_sync()`` (nothing
    is reduced), with a comm hook registered (its compression or state is the caller's choice),
    with DDP modules on different process groups, or with FSDP2 units among the encoders (which
    communicate in every chunk, so no agreement could spare them a failing rank).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return None, []
    listed = list(encoders) if isinstance(encoders, (list, tuple)) else [encoders]
    wrapped = list({id(encoder): encoder for encoder in listed if is_ddp(encoder)}.values())
    if (not wrapped or any(fsdp_units(encoder) for encoder in listed)
            or len({id(ddp.process_group) for ddp in wrapped}) > 1
            or any(getattr(ddp, "_comm_hooks", True) for ddp in wrapped)
            or not all(ddp.require_backward_grad_sync for ddp in wrapped)):
        return None, []
    group = wrapped[0].process_group
    for ddp in wrapped:   # as DDP's forward would (every chunk now bypasses it)
        if ddp.broadcast_buffers and any(True for _ in ddp.module.buffers()):
            broadcast_buffers(ddp.module, group, ddp.parameters_to_ignore)
    return (Rendezvous(TorchCollective(group), planned=1),
            [(ddp.module, group, ddp.parameters_to_ignore) for ddp in wrapped])


def _distribute(encoders: Any, loss_fn: Any, distributed: Any) -> tuple[Collective, list]:
    """The collective of a distributed step and the ``(module, group, ignored names)`` whose
    gradients the adapter averages (DDP and unwrapped modules: :class:`GradientSync`).

    A :class:`gradcache.Collective` that is not a :class:`TorchCollective` (your own transport, or
    ``gradcache.testing.ThreadCollective``) is used as it is: each rank's ``.grad`` then receives
    its own rows' share (times the collective's ``grad_scale``), and reducing it is the caller's.
    """
    if isinstance(distributed, Collective) and not isinstance(distributed, TorchCollective):
        return distributed, []
    given = distributed if isinstance(distributed, TorchCollective) else None
    group = given.group if given is not None else resolve_group(distributed)
    loss_group = getattr(loss_fn, "group", None)
    if getattr(loss_fn, "gathers_itself", False) and loss_group is not group:
        raise GradCacheError(
            f"the loss communicates over process group {loss_group!r} but the step over "
            f"{group!r}; give across_ranks(..., group=...) the step's group")
    listed = list(encoders) if isinstance(encoders, (list, tuple)) else [encoders]
    averaged, sharded = [], False
    for index, encoder in enumerate(listed):
        if fsdp_units(encoder):
            sharded = True   # FSDP2 reduce-scatters its own gradients
        elif is_ddp(encoder):
            averaged.append((encoder.module, encoder.process_group, encoder.parameters_to_ignore))
            if encoder.broadcast_buffers and any(True for _ in encoder.module.buffers()):
                broadcast_buffers(encoder.module, encoder.process_group,
                                  encoder.parameters_to_ignore)
        elif isinstance(encoder, torch.nn.Module):
            averaged.append((encoder, group, ()))
        else:
            raise GradCacheError(
                f"distributed=... needs every encoder to be a torch.nn.Module (DDP, FSDP2 or plain) "
                f"so that its gradients can be synchronised; encoder {index} is "
                f"{type(encoder).__name__}")
    # FSDP2 all-gathers its parameters in every forward and backward: equal chunk counts needed
    collective = given if given is not None else TorchCollective(group)
    collective.same_chunk_counts = sharded
    return collective, averaged
