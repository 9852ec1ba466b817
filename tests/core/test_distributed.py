"""The core's distributed schedule on thread ranks: exact global-batch gradients, uneven ranks,
and every rank stopping cleanly when one fails."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradcache import GradCacheError, run_cached_step
from gradcache.testing import LinearEncoder, NumpyBackend, NumpyInfoNCE, examples, run_ranks


def split(rows: np.ndarray, counts: list[int]) -> list[np.ndarray]:
    return np.split(rows, np.cumsum(counts)[:-1])


@settings(max_examples=examples(25), deadline=None)
@given(counts=st.lists(st.integers(1, 7), min_size=1, max_size=4),
       chunk=st.integers(1, 5), scale=st.sampled_from([1.0, 2.0]), seed=st.integers(0, 99))
def test_sum_over_ranks_equals_the_global_batch_gradient(counts, chunk, scale, seed) -> None:
    rng = np.random.default_rng(seed)
    encoder = LinearEncoder(rng.normal(size=(5, 3)))
    total = sum(counts)
    queries, passages = rng.normal(size=(total, 5)), rng.normal(size=(total, 5))
    want_loss, want = run_cached_step(NumpyBackend(), encoder, (queries, passages),
                                      NumpyInfoNCE(), chunk_size=total)

    def rank_step(rank, collective):
        q, p = split(queries, counts)[rank], split(passages, counts)[rank]
        return run_cached_step(NumpyBackend(), encoder, (q, p), NumpyInfoNCE(), chunk_size=chunk,
                               collective=collective)

    outcomes = run_ranks(len(counts), rank_step, grad_scale=scale)
    assert all(error is None for _, error in outcomes), outcomes
    summed = sum(grads[id(encoder)]["weight"] for (_, grads), _ in outcomes)
    # grad_scale multiplies what every rank pulls back (an averaging wrapper divides it out)
    np.testing.assert_allclose(summed / scale, want[id(encoder)]["weight"], rtol=1e-10, atol=1e-12)
    for (loss, _), _ in outcomes:
        np.testing.assert_allclose(loss, want_loss, rtol=1e-12)


def test_a_failing_rank_stops_every_rank_at_the_same_agreement() -> None:
    rng = np.random.default_rng(0)
    encoder = LinearEncoder(rng.normal(size=(5, 3)))

    class Boom(RuntimeError):
        pass

    def failing(x):
        raise Boom("no memory left")

    def rank_step(rank, collective):
        x = rng.normal(size=(4, 5))
        return run_cached_step(NumpyBackend(), failing if rank == 1 else encoder, (x, x),
                               NumpyInfoNCE(), chunk_size=2, collective=collective)

    outcomes = run_ranks(3, rank_step)
    assert isinstance(outcomes[1][1], Boom)
    for rank in (0, 2):
        error = outcomes[rank][1]
        assert isinstance(error, GradCacheError)
        assert "rank 1 failed (Boom: no memory left); every rank stopped (after pass 1)" in str(error)


def test_a_rank_failing_in_pass_two_stops_the_others_before_they_synchronise() -> None:
    rng = np.random.default_rng(1)
    weight = rng.normal(size=(5, 3))

    class Flaky(LinearEncoder):
        def vjp(self, x, rep_grad):
            raise ValueError("pass two broke")

    def rank_step(rank, collective):
        encoder = Flaky(weight) if rank == 0 else LinearEncoder(weight)
        x = rng.normal(size=(6, 5))
        return run_cached_step(NumpyBackend(), encoder, (x, x), NumpyInfoNCE(), chunk_size=2,
                               collective=collective)

    outcomes = run_ranks(2, rank_step)
    assert isinstance(outcomes[0][1], ValueError)
    assert "rank 0 failed (ValueError: pass two broke); every rank stopped (after pass 2)" in str(outcomes[1][1])


def test_ranks_must_run_the_same_step() -> None:
    rng = np.random.default_rng(2)
    encoder = LinearEncoder(rng.normal(size=(5, 3)))
    wide = LinearEncoder(rng.normal(size=(5, 4)))

    def rank_step(rank, collective):
        x = rng.normal(size=(4, 5))
        return run_cached_step(NumpyBackend(), wide if rank else encoder, (x, x), NumpyInfoNCE(),
                               chunk_size=2, collective=collective)

    outcomes = run_ranks(2, rank_step)
    for _, error in outcomes:
        assert isinstance(error, GradCacheError)
        assert "differ between ranks beyond the number of rows" in str(error)


def test_a_loss_that_gathers_itself_gets_local_representations() -> None:
    seen = []

    class Local(NumpyInfoNCE):
        gathers_itself = True

        def value_and_grad(self, *reps):
            seen.append(reps[0].shape[0])
            return super().value_and_grad(*reps)

    rng = np.random.default_rng(3)
    encoder = LinearEncoder(rng.normal(size=(5, 3)))

    def rank_step(rank, collective):
        x = rng.normal(size=(3 + rank, 5))
        run_cached_step(NumpyBackend(), encoder, (x, x), Local(), chunk_size=2, collective=collective)
        return collective.calls

    outcomes = run_ranks(2, rank_step)
    assert sorted(seen) == [3, 4]
    assert all(calls == ["exchange", "exchange"] for calls, _ in outcomes), outcomes


@pytest.mark.parametrize("world", [2, 4])
def test_collectives_run_once_per_step(world) -> None:
    rng = np.random.default_rng(4)
    encoder = LinearEncoder(rng.normal(size=(5, 3)))

    def rank_step(rank, collective):
        x = rng.normal(size=(5, 5))
        run_cached_step(NumpyBackend(), encoder, (x, x), NumpyInfoNCE(), chunk_size=2,
                        collective=collective)
        return collective.calls

    for calls, error in run_ranks(world, rank_step):
        assert error is None
        # agreement after pass 1, one all-gather per group, agreement before the synchronising chunk
        assert calls == ["exchange", "all_gather", "all_gather", "exchange"]


def test_a_rank_failing_in_its_last_chunk_still_stops_every_rank() -> None:
    rng = np.random.default_rng(5)
    weight = rng.normal(size=(5, 3))

    class FailsLast(LinearEncoder):
        calls = 0

        def vjp(self, x, rep_grad):
            FailsLast.calls += 1
            if FailsLast.calls == 3:    # the last chunk of pass 2
                raise ValueError("late")
            return super().vjp(x, rep_grad)

    def rank_step(rank, collective):
        x = rng.normal(size=(6, 5))
        encoder = FailsLast(weight) if rank == 0 else LinearEncoder(weight)
        return run_cached_step(NumpyBackend(), encoder, (x,), NumpyInfoNCE(),
                               chunk_size=2, collective=collective)

    outcomes = run_ranks(2, rank_step, timeout=5)
    assert isinstance(outcomes[0][1], ValueError)
    assert "rank 0 failed (ValueError: late); every rank stopped (after pass 2)" in str(outcomes[1][1])


def test_a_loss_that_gathers_itself_needs_a_distributed_step() -> None:
    class Local(NumpyInfoNCE):
        gathers_itself = True

    rng = np.random.default_rng(7)
    x = rng.normal(size=(4, 5))
    with pytest.raises(GradCacheError, match="needs a distributed step"):
        run_cached_step(NumpyBackend(), LinearEncoder(rng.normal(size=(5, 3))), (x, x), Local(),
                        chunk_size=2)


def test_bad_input_on_one_rank_stops_every_rank() -> None:
    rng = np.random.default_rng(6)
    encoder = LinearEncoder(rng.normal(size=(5, 3)))

    def rank_step(rank, collective):
        x = rng.normal(size=(4, 5))
        inputs = (x, x) if rank == 0 else {"not": "a sequence"}
        return run_cached_step(NumpyBackend(), encoder, inputs, NumpyInfoNCE(), chunk_size=2,
                               collective=collective)

    outcomes = run_ranks(2, rank_step, timeout=5)
    assert "inputs must be a list or tuple" in str(outcomes[1][1])
    assert "rank 1 failed (GradCacheError: inputs must be a list" in str(outcomes[0][1])
