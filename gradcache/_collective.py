"""The collective protocol: how the ranks of one distributed step talk, and the rendezvous on failure.

A distributed cached step is the single-process schedule with one extra stage between the passes:
each rank's representations are gathered into the global batch (rank order), the loss and its
gradient are taken on the global batch, and each rank keeps the gradient of its own rows. Pass 1
and pass 2 stay local, so ranks may hold different numbers of rows and chunks. An adapter supplies
a :class:`Collective` over its framework's own engine (``torch.distributed``, a JAX mesh axis, a
``tf.distribute`` replica context); the core never moves a byte itself.

Multi-process engines can hang when one rank raises and the others wait in a collective. The
:class:`Rendezvous` gives every step a fixed sequence of small *agreements* (after pass 1, after
pass 2, and before pass 1 where encoders communicate in every call): a rank that fails -- any
exception, ``KeyboardInterrupt`` included -- takes part in the next agreement with its error
instead, so every rank raises at the same point and no gradient is applied anywhere -- the adapter
synchronises gradients only after the last agreement. A Ctrl-C during an agreement's exchange is
held until the exchange is over (and, with an agreement still ahead, reported there), so that it
never splits an exchange made of several collectives. Every agreement carries the step's number
(counted per collective, per process group on torch) and its stage, so that ranks which fell out
of step (one abandoned a step without reaching its agreements) raise instead of taking another
step's payload for this one's. SPMD engines (one program over all devices) fail as a whole and
need none.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from gradcache._errors import GradCacheError, add_location_note


class StepCounter:
    """The number of agreeing steps begun so far (see :meth:`Collective.step_counter`)."""

    def __init__(self) -> None:
        self.value = 0


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
    _step_counter: StepCounter | None = None

    def exchange(self, payload: Any) -> list[Any]:
        """Every rank's small picklable ``payload``, in rank order (a host-side all-gather)."""
        raise NotImplementedError

    def step_counter(self) -> StepCounter:
        """The counter of the agreeing steps this rank has begun over this collective's ranks,
        which :class:`Rendezvous` numbers its steps with. The default lives on the instance (one
        collective object kept for the whole run); an adapter that makes a collective per call
        keeps it per communicator instead (torch: per process group)."""
        counter = getattr(self, "_step_counter", None)
        if counter is None:
            counter = StepCounter()
            self._step_counter = counter
        return counter

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


def _where(step: Any, stage: Any) -> str:
    return f"step {step} ({stage})" if stage is not None else f"step {step}"


class Rendezvous:
    """The agreements of one distributed step; a no-op without a collective or for SPMD engines.

    Every rank calls :meth:`agree` at the same points of the schedule. A rank that raised calls
    :meth:`fail` instead, once, which takes part in the next agreement with its error: the others
    raise a :class:`GradCacheError` naming it, and the failing rank re-raises its own error.

    Each report carries ``(step, stage, error, payload)``: the step's number, from the collective's
    :meth:`~Collective.step_counter` (advanced when the rendezvous is made, on every rank at the
    same point of a step), and the agreement's stage. A report from another step or stage means
    that the ranks fell out of step -- one left a step without reaching its agreements -- and every
    rank raises a :class:`GradCacheError` naming each rank's step instead of using the payload;
    the counters are then set to the furthest step, so that the ranks' next steps meet again.
    """

    def __init__(self, collective: Collective | None, planned: int = 0):
        self.collective = collective
        self.active = collective is not None and collective.agrees
        self.failed = False
        self.planned = planned   # agreements every rank will reach in a step that succeeds
        self.done = 0
        self.step = 0
        #: a Ctrl-C that arrived during an exchange with an agreement still ahead: reported there
        self.held: tuple[int, Any] | None = None
        if self.active and collective is not None:
            counter = collective.step_counter()
            counter.value += 1
            self.step = counter.value

    def agree(self, stage: str, payload: Any = None) -> list[Any]:
        """Exchanges ``payload`` at ``stage``; raises if another rank reports a failure or is at
        another step or stage."""
        collective = self.collective
        if not self.active or collective is None:
            return [payload] * (collective.world_size if collective else 1)
        # a Ctrl-C held at the previous agreement is raised here: the caller's fail() reports it
        self._deliver_held()
        caught: list[tuple[int, Any]] = []
        try:
            with _interrupts_held(caught):
                reports = collective.exchange((self.step, stage, None, payload))
            self.done += 1
            strays = self._strays(reports, stage)
            if strays:
                self.failed = True
                raise GradCacheError(
                    f"the ranks are out of step: {strays}; this rank ({collective.rank}) is at "
                    f"{_where(self.step, stage)}. A rank left an earlier step without reaching "
                    f"its agreements (an exception caught between steps, a call on some ranks "
                    f"only); every rank stopped and no gradient was applied (the ranks' next "
                    f"steps meet again)")
            failures = [(rank, report[2]) for rank, report in enumerate(reports)
                        if report[2] is not None]
            if failures:
                self.failed = True
                rank, error = failures[0]
                raise GradCacheError(
                    f"rank {rank} failed ({error}); every rank stopped ({stage}) and no gradient "
                    f"was applied")
        finally:
            if caught:
                # the others carry on into the step's collectives: with an agreement ahead this
                # rank does too and reports the interrupt there; else (or if the step failed
                # here) it is raised now
                self.held = caught[0]
                if self.failed or self.done >= self.planned:
                    self._deliver_held()
        return [report[3] for report in reports]

    def fail(self, error: BaseException) -> None:
        """Reports ``error`` (any exception, ``KeyboardInterrupt`` included) to the other ranks at
        the next agreement (once per step).

        After the last agreement there is nobody left to tell: the others have passed it, and a
        wrapper's own collective (or the engine's timeout) is what they meet next.
        """
        collective = self.collective
        if not self.active or collective is None or self.failed or self.done >= self.planned:
            return
        self.failed = True
        caught: list[tuple[int, Any]] = []
        try:
            with _interrupts_held(caught):
                reports = collective.exchange((self.step, None, _describe(error), None))
        except Exception as transport:  # the transport itself broke: the original error matters more
            add_location_note(error, f"gradcache: could not tell the other ranks "
                                     f"({_describe(transport)})")
            return
        finally:
            # a Ctrl-C held from an agreement, or caught during this report: raised now (once
            # the others know), unless what is being reported is one already
            if caught and self.held is None:
                self.held = caught[0]
            if not isinstance(error, KeyboardInterrupt):
                self._deliver_held()
            self.held = None
        strays = self._strays(reports, None)
        if strays:
            add_location_note(error, f"gradcache: the ranks were out of step when this rank "
                                     f"reported this error at step {self.step}: {strays}")

    def _deliver_held(self) -> None:
        """Runs the ``SIGINT`` handler for a Ctrl-C held from an exchange (Python's raises
        ``KeyboardInterrupt``)."""
        if self.held is None:
            return
        held, self.held = self.held, None
        handler = signal.getsignal(signal.SIGINT)
        if callable(handler):
            handler(*held)

    def _strays(self, reports: list[Any], stage: str | None) -> str:
        """The ranks whose report belongs to another step or stage, worded; empty when none.
        Moves the step counter to the furthest step seen, so that the next steps meet again."""
        strays, furthest = [], self.step
        for rank, report in enumerate(reports):
            if not (isinstance(report, tuple) and len(report) == 4
                    and isinstance(report[0], int)):
                strays.append(f"rank {rank} sent {type(report).__name__} {_short(report)}, not a "
                              f"gradcache agreement (is it in another collective?)")
                continue
            step, their_stage, error = report[0], report[1], report[2]
            furthest = max(furthest, step)
            if step != self.step:
                strays.append(f"rank {rank} is at {_where(step, their_stage)}"
                              + (f", failing with {error}" if error is not None else ""))
            elif stage is not None and their_stage is not None and their_stage != stage:
                strays.append(f"rank {rank} is at {_where(step, their_stage)}")
        if strays and self.collective is not None:
            counter = self.collective.step_counter()
            counter.value = max(counter.value, furthest)
        return "; ".join(strays)


@contextlib.contextmanager
def _interrupts_held(caught: list[tuple[int, Any]]) -> Iterator[None]:
    """Holds back a Ctrl-C (``SIGINT``) that arrives during the block: it is appended to
    ``caught`` (as ``(signum, frame)``) for the caller to act on, instead of raising inside.

    An exchange may be several collectives (torch's ``all_gather_object``: the sizes, then the
    data), and a rank waits for the slowest in the first, so that is where a Ctrl-C most likely
    lands: a ``KeyboardInterrupt`` raised between them would leave this rank out of the second,
    and its report of the interrupt would meet the others' second collective (gloo aborts the
    process, the others read garbage). Python runs signal handlers in the main thread only:
    elsewhere, or under a handler that is not Python's, the block runs as it is.
    """
    handler = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or not callable(handler):
        yield
        return
    signal.signal(signal.SIGINT, lambda signum, frame: caught.append((signum, frame)))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, handler)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
