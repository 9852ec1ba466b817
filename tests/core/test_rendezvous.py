"""The rendezvous on thread ranks: every exception reaches the agreement (``KeyboardInterrupt``
included), and ranks that fell out of step raise, naming each rank's step, instead of taking
another step's payload for this one's."""

from __future__ import annotations

import numpy as np
import pytest

from gradcache import Collective, GradCacheError, Rendezvous, run_cached_step
from gradcache.testing import LinearEncoder, NumpyBackend, NumpyInfoNCE, run_ranks


def batch(rank: int, step: int) -> np.ndarray:
    return np.random.default_rng(10 * rank + step).normal(size=(4, 5))


def test_a_keyboard_interrupt_on_one_rank_stops_every_rank_and_the_loop_goes_on() -> None:
    weight = np.random.default_rng(0).normal(size=(5, 3))

    def rank_loop(rank, collective):
        outcomes = []
        for step in range(2):
            encoder = LinearEncoder(weight)
            if rank == 1 and step == 0:
                def interrupted(x):
                    raise KeyboardInterrupt
                encoder = interrupted
            x = batch(rank, step)
            try:
                loss, _ = run_cached_step(NumpyBackend(), encoder, (x, x), NumpyInfoNCE(),
                                          chunk_size=2, collective=collective)
                outcomes.append(float(loss))
            except BaseException as error:   # the training loop catches it and goes on
                outcomes.append(error)
        return outcomes

    (first, _), (second, _) = run_ranks(2, rank_loop, timeout=5)
    assert isinstance(second[0], KeyboardInterrupt)
    assert isinstance(first[0], GradCacheError)
    assert "rank 1 failed (KeyboardInterrupt); every rank stopped (after pass 1)" in str(first[0])
    # the next step meets as one: both ranks hold the same global loss
    assert isinstance(first[1], float) and first[1] == second[1]


def test_ranks_out_of_step_raise_naming_both_steps_then_meet_again() -> None:
    weight = np.random.default_rng(1).normal(size=(5, 3))

    def rank_loop(rank, collective):
        if rank == 1:
            # a step begun and left without an agreement (as an exception the step never saw)
            Rendezvous(collective, planned=2)
        outcomes = []
        for step in range(2):
            x = batch(rank, step)
            try:
                loss, _ = run_cached_step(NumpyBackend(), LinearEncoder(weight), (x, x),
                                          NumpyInfoNCE(), chunk_size=2, collective=collective)
                outcomes.append(float(loss))
            except GradCacheError as error:
                outcomes.append(str(error))
        return outcomes

    (first, _), (second, _) = run_ranks(2, rank_loop, timeout=5)
    assert "the ranks are out of step: rank 1 is at step 2 (after pass 1); this rank (0) is at " \
        "step 1 (after pass 1)" in first[0], first[0]
    assert "rank 0 is at step 1 (after pass 1); this rank (1) is at step 2" in second[0], second[0]
    assert "no gradient was applied" in first[0]
    assert isinstance(first[1], float) and first[1] == second[1]


def test_a_rank_in_another_collective_is_not_taken_for_an_agreement() -> None:
    weight = np.random.default_rng(2).normal(size=(5, 3))

    def rank_step(rank, collective):
        if rank == 1:
            return collective.exchange("a user all-gather")
        x = batch(rank, 0)
        return run_cached_step(NumpyBackend(), LinearEncoder(weight), (x, x), NumpyInfoNCE(),
                               chunk_size=2, collective=collective)

    (_, error), _ = run_ranks(2, rank_step, timeout=5)
    assert isinstance(error, GradCacheError)
    assert "rank 1 sent str 'a user all-gather', not a gradcache agreement" in str(error)


def test_a_failure_the_transport_cannot_carry_keeps_the_original_error_with_a_note() -> None:
    class Broken(Collective):
        agrees = True
        world_size = 2

        def exchange(self, payload):
            raise ConnectionError("peer gone")

    class WithoutAddNote(MemoryError):
        add_note = None   # as on Python 3.10, which has no BaseException.add_note

    for error in (MemoryError("out of memory"), WithoutAddNote("out of memory")):
        Rendezvous(Broken(), planned=2).fail(error)
        assert error.__notes__ == [
            "gradcache: could not tell the other ranks (ConnectionError: peer gone)"]


@pytest.fixture
def python_sigint_handler():
    """Python's own SIGINT handler, as a script run from a terminal has it: a pytest-xdist worker
    ignores SIGINT (its controller handles Ctrl-C), under which a Ctrl-C never happens at all."""
    import signal
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


class _Interrupted(Collective):
    """One rank whose exchanges record what they sent; the ``at``-th is interrupted by a real
    ``SIGINT`` while it runs (as a Ctrl-C lands while a rank waits for the others)."""

    agrees = True
    world_size = 1

    def __init__(self, at: int):
        self.at, self.sent = at, []

    def exchange(self, payload):
        import signal
        self.sent.append(payload)
        if len(self.sent) == self.at:
            signal.raise_signal(signal.SIGINT)   # its handler runs on the next bytecode
        return [payload]


def test_a_ctrl_c_inside_an_exchange_is_reported_at_the_next_agreement(python_sigint_handler) -> None:
    # raised inside the exchange, it would split a multi-collective exchange (torch's
    # all_gather_object) and leave this rank's report to meet the others' next collective
    collective = _Interrupted(at=1)
    rendezvous = Rendezvous(collective, planned=2)
    assert rendezvous.agree("after pass 1", "payload") == ["payload"]   # held, the step goes on
    try:
        rendezvous.agree("after pass 2")
    except KeyboardInterrupt as error:
        rendezvous.fail(error)   # as the schedule does
    else:
        raise AssertionError("the held Ctrl-C was not raised at the next agreement")
    assert [sent[1:3] for sent in collective.sent] == [("after pass 1", None),
                                                       (None, "KeyboardInterrupt")]


def test_a_ctrl_c_inside_the_last_agreement_is_raised_after_it(python_sigint_handler) -> None:
    collective = _Interrupted(at=1)
    rendezvous = Rendezvous(collective, planned=1)
    try:
        rendezvous.agree("after pass 2")
    except KeyboardInterrupt as error:
        rendezvous.fail(error)   # nothing left to tell: no second exchange
    else:
        raise AssertionError("the Ctrl-C was lost")
    assert len(collective.sent) == 1 and rendezvous.done == 1


def test_a_held_ctrl_c_is_raised_when_the_rank_fails_otherwise(python_sigint_handler) -> None:
    collective = _Interrupted(at=1)
    rendezvous = Rendezvous(collective, planned=2)
    rendezvous.agree("after pass 1")
    try:
        rendezvous.fail(RuntimeError("pass 2 broke"))   # reported first, then the interrupt
    except KeyboardInterrupt:
        pass
    else:
        raise AssertionError("the held Ctrl-C was lost")
    assert collective.sent[-1][2] == "RuntimeError: pass 2 broke"
