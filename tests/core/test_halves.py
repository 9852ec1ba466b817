"""The schedule's two halves: ``cached_forward`` (pass 1 and the loss) and ``cached_backward``.

``run_cached_step`` is the two run back to back; a framework-driven backward pass (the
differentiable cached loss) runs them apart, with the incoming gradient as ``upstream``. These tests
pin what that needs on the numpy backend: the halves give the step's gradients, ``upstream`` scales
them exactly, a forward is pulled back once, and a failure in either half reaches the other ranks.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradcache import GradCacheError, cached_backward, cached_forward, run_cached_step
from gradcache.testing import LinearEncoder, NumpyBackend, NumpyInfoNCE, examples, run_ranks


def _problem(seed: int, batch: int, dim: int = 4, out: int = 3):
    rng = np.random.default_rng(seed)
    encoder = LinearEncoder(rng.normal(size=(dim, out)))
    return encoder, (rng.normal(size=(batch, dim)), rng.normal(size=(batch, dim)))


@settings(max_examples=examples(40), deadline=None)
@given(seed=st.integers(0, 2**16), batch=st.integers(1, 12), chunk=st.integers(1, 13),
       upstream=st.floats(-4, 4, allow_nan=False).filter(lambda v: abs(v) > 1e-3))
def test_halves_with_upstream_scale_the_whole_step(seed, batch, chunk, upstream) -> None:
    encoder, inputs = _problem(seed, batch)
    loss, grads = run_cached_step(NumpyBackend(), encoder, inputs, NumpyInfoNCE(), chunk_size=chunk)
    forward = cached_forward(NumpyBackend(), encoder, inputs, NumpyInfoNCE(), chunk_size=chunk)
    assert forward.loss == loss
    scaled = cached_backward(forward, upstream=upstream)
    np.testing.assert_allclose(scaled[id(encoder)]["weight"],
                               upstream * grads[id(encoder)]["weight"], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("upstream", [np.array([1.0, 2.0, 3.0]), "2", True, 1j])
def test_upstream_must_be_a_real_scalar(upstream) -> None:
    # a vector once broadcast into wrong gradients
    encoder, inputs = _problem(0, 6)
    forward = cached_forward(NumpyBackend(), encoder, inputs, NumpyInfoNCE(), chunk_size=4)
    with pytest.raises(GradCacheError, match="upstream must be"):
        cached_backward(forward, upstream=upstream)


def test_a_forward_is_pulled_back_once() -> None:
    encoder, inputs = _problem(0, 6)
    forward = cached_forward(NumpyBackend(), encoder, inputs, NumpyInfoNCE(), chunk_size=4)
    cached_backward(forward)
    with pytest.raises(GradCacheError, match="already pulled back"):
        cached_backward(forward)


def test_a_released_forward_cannot_be_pulled_back() -> None:
    encoder, inputs = _problem(0, 6)
    forward = cached_forward(NumpyBackend(), encoder, inputs, NumpyInfoNCE(), chunk_size=4)
    forward.close()
    forward.close()   # idempotent
    assert forward.rep_grads == [] and forward.records == []
    with pytest.raises(GradCacheError, match="already pulled back"):
        cached_backward(forward)


def test_a_failing_backward_releases_the_forward() -> None:
    encoder, inputs = _problem(0, 6)
    forward = cached_forward(NumpyBackend(), encoder, inputs, NumpyInfoNCE(), chunk_size=4)
    encoder.weight = encoder.weight[:2]   # the model changed between forward and backward
    with pytest.raises(Exception):  # noqa: B017 - numpy's own shape error
        cached_backward(forward)
    assert forward.consumed and forward.rep_grads == []


def test_a_rank_failing_in_the_backward_stops_every_rank() -> None:
    def rank_step(rank: int, collective) -> str:
        encoder, inputs = _problem(rank, 4)
        forward = cached_forward(NumpyBackend(), encoder, inputs, NumpyInfoNCE(), chunk_size=2,
                                 collective=collective)
        if rank == 1:
            encoder.weight = encoder.weight[:2]
        cached_backward(forward)
        return "no error"

    (first, first_error), (second, second_error) = run_ranks(2, rank_step)
    assert isinstance(first_error, GradCacheError) and "rank 1 failed" in str(first_error)
    assert second_error is not None and second is None
