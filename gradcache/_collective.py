"""The collective protocol: how the ranks of one distributed step talk, and the rendezvous on failure.

A distributed cached step is the single-process schedule with one extra stage between the passes:
each rank's representations are gathered into the global batch (rank order), the loss and its
gradient are taken on the global batch, and each rank keeps the gradient of its own rows. Pass 1
and pass 2 stay local, so ranks may hold different numbers of rows and chunks. An adapter supplies
a :class:`Collective` over its framework's own engine (``torch.distributed``, a JAX mesh axis, a
``tf.distribute`` replica context); the core never moves a byte itself.

Multi-process engines can hang when one rank raises and the others wait in a collective. The
:class:`Rendezvous` gives every step a fixed sequence of small *agreements* (after pass 1, after
pass 2, and before pass 1 where encoders communicate in every call): a rank that fails takes part
in the next agreement with its error instead, so every rank raises at the same point and no
gradient is applied anywhere -- the adapter synchronises gradients only after the last agreement.
SPMD engines (one program over all devices) fail as a whole and need none.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gradcache._errors import GradCacheError, add_location_note


class Collective:
    """Communication among the ranks of one step; subclasses implement the primitives they need.

    Attributes:
        world_size: number of ranks taking part.
        rank: this rank's index, ``0 <= rank < world_size`` (a traced integer on SPMD engines).
        grad_scale: the factor applied to every rank's representation gradients before pass 2, so
            that what the framework's gradient reduction leaves equals the global-batch gradient:
            ``world_size`` when the wrapper *averages* gradients over ranks (DDP, FSDP2), ``1`` when
            it sums them.
        agrees: true for multi-process engines whose ranks must :meth:`exchange` status to avoid
            hanging; false for SPMD engines, where :meth:`exchange` is never called.
        same_chunk_counts: every rank must encode the same number of chunks per group, because
            the encoder itself communicates in each call (FSDP2 gathers its parameters in every
            forward); checked before pass 1, so that unequal counts raise instead of mismatching.

    Gradients of parameters the loss owns (a learnable temperature) come from the global loss, the
    same on every rank; a backend whose gradient reduction would also cover them must count them
    once (JAX adds them after its ``psum``, TF gives them to replica 0 only, torch leaves them out
    of every wrapper's reduction).
    """

    world_size: int = 1
    rank: Any = 0
    grad_scale: float = 1.0
    agrees: bool = False
    same_chunk_counts: bool = False

    def exchange(self, payload: Any) -> list[Any]:
        """Every rank's small picklable ``payload``, in rank order (a host-side all-gather)."""
        raise NotImplementedError

    def row_counts(self, rows: int | None) -> Any:
        """Every rank's row count of a group of which this rank holds ``rows``, for an engine that
        does not :attr:`agree` (agreeing engines learn them from :meth:`exchange`). ``rows`` is the
        representation's static row count, ``None`` where its shape leaves it unknown.

        The result is opaque to the core: it only hands it back as the ``counts`` of the row
        operations of that group. The default, ``[rows] * world_size``, suits SPMD engines whose
        shards share one static shape (a JAX mesh); an engine whose replicas may differ (TF's
        ``all_gather`` accepts unequal rows) gathers the counts here, once per group.
        """
        return [rows] * self.world_size

    def every_shape(self, shape: Any) -> list[Any]:
        """Every rank's value of a small static ``shape`` (a tuple of ints), in rank order: what
        :func:`gradcache._loss_forms.layout_across` plans from. The default exchanges it on
        agreeing engines and takes it to be the same everywhere on SPMD ones; an engine whose
        replicas may differ eagerly (TF) gathers it."""
        if self.agrees:
            return list(self.exchange(shape))
        return [shape] * self.world_size

    def all_gather_rows(self, leaf: Any, counts: Sequence[int]) -> Any:
        """The rank-ordered concatenation of every rank's ``leaf``; rank ``r`` holds ``counts[r]`` rows."""
        raise NotImplementedError

    def local_rows(self, leaf: Any, counts: Sequence[int]) -> Any:
        """This rank's rows of a global tensor laid out as :meth:`all_gather_rows` returns it."""
        raise NotImplementedError

    def reduce_scatter_rows(self, leaf: Any, counts: Sequence[int]) -> Any:
        """Sums a global-layout tensor over ranks and returns this rank's rows of the sum."""
        raise NotImplementedError

    def all_reduce_sum(self, value: Any) -> Any:
        """The sum over ranks of a tensor of the same shape on every rank."""
        raise NotImplementedError


def _describe(error: BaseException) -> str:
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class Rendezvous:
    """The agreements of one distributed step; a no-op without a collective or for SPMD engines.

    Every rank calls :meth:`agree` at the same points of the schedule. A rank that raised calls
    :meth:`fail` instead, once, which takes part in the next agreement with its error: the others
    raise a :class:`GradCacheError` naming it, and the failing rank re-raises its own error.
    """

    def __init__(self, collective: Collective | None, planned: int = 0):
        self.collective = collective
        self.active = collective is not None and collective.agrees
        self.failed = False
        self.planned = planned   # agreements every rank will reach in a step that succeeds
        self.done = 0

    def agree(self, stage: str, payload: Any = None) -> list[Any]:
        """Exchanges ``payload`` at ``stage``; raises if another rank reports a failure."""
        collective = self.collective
        if not self.active or collective is None:
            return [payload] * (collective.world_size if collective else 1)
        reports = collective.exchange((None, payload))
        self.done += 1
        failures = [(rank, error) for rank, (error, _) in enumerate(reports) if error is not None]
        if failures:
            self.failed = True
            rank, error = failures[0]
            raise GradCacheError(
                f"rank {rank} failed ({error}); every rank stopped ({stage}) and no gradient was "
                f"applied")
        return [payload for _, payload in reports]

    def fail(self, error: BaseException) -> None:
        """Reports ``error`` to the other ranks at the next agreement (once per step).

        After the last agreement there is nobody left to tell: the others have passed it, and a
        wrapper's own collective (or the engine's timeout) is what they meet next.
        """
        collective = self.collective
        if not self.active or collective is None or self.failed or self.done >= self.planned:
            return
        self.failed = True
        try:
            collective.exchange((_describe(error), None))
        except Exception as transport:  # the transport itself broke: the original error matters more
            add_location_note(error, f"gradcache: could not tell the other ranks "
                                     f"({_describe(transport)})")
