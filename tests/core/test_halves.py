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


class _Counting(LinearEncoder):
    """A LinearEncoder that counts its forward calls and its vjp calls."""

    def __init__(self, weight: np.ndarray, trainable: bool = True):
        super().__init__(weight)
        self.trainable = trainable
        self.calls = {"forward": 0, "vjp": 0}

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.calls["forward"] += 1
        return super().__call__(x)

    def vjp(self, x: np.ndarray, rep_grad: np.ndarray) -> tuple:
        self.calls["vjp"] += 1
        return super().vjp(x, rep_grad)


def test_an_evaluation_forward_takes_the_loss_alone() -> None:
    # a trainer's evaluation loop (torch.no_grad) wants the loss, and no gradient anywhere
    encoder, inputs = _problem(0, 7)
    counting = _Counting(encoder.weight)
    loss, _ = run_cached_step(NumpyBackend(), encoder, inputs, NumpyInfoNCE(), chunk_size=3)
    forward = cached_forward(NumpyBackend(), counting, inputs, NumpyInfoNCE(), chunk_size=3,
                             differentiate=False)
    assert forward.loss == loss
    assert forward.grads is None and forward.rep_grads == []
    assert counting.calls == {"forward": 6, "vjp": 0}
    with pytest.raises(GradCacheError, match="taken without gradients"):
        cached_backward(forward)


def test_a_frozen_tower_is_encoded_once_and_skipped_in_pass_two() -> None:
    # LiT-style: a locked image tower beside a trained text tower
    rng = np.random.default_rng(3)
    trained, frozen = _Counting(rng.normal(size=(4, 3))), _Counting(rng.normal(size=(4, 3)), False)
    inputs = (rng.normal(size=(6, 4)), rng.normal(size=(6, 4)))
    _, grads = run_cached_step(NumpyBackend(), [trained, frozen], inputs, NumpyInfoNCE(),
                               chunk_size=4)
    assert frozen.calls == {"forward": 2, "vjp": 0}
    assert id(frozen) not in grads
    # the trained tower's gradient is the full step's, where the frozen one's is simply dropped
    both = [LinearEncoder(trained.weight), LinearEncoder(frozen.weight)]
    _, reference = run_cached_step(NumpyBackend(), both, inputs, NumpyInfoNCE(), chunk_size=6)
    np.testing.assert_allclose(grads[id(trained)]["weight"], reference[id(both[0])]["weight"],
                               rtol=1e-12)


def test_get_rep_may_take_the_chunks_inputs() -> None:
    # pooling over an attention mask needs the chunk's inputs next to the encoder's output
    encoder, inputs = _problem(1, 5)
    seen: list = []

    def pick(output, chunk):
        seen.append(chunk.shape[0])
        assert output.shape[0] == chunk.shape[0]
        return output

    loss, grads = run_cached_step(NumpyBackend(), encoder, inputs, NumpyInfoNCE(), chunk_size=2,
                                  get_rep=pick)
    expected, reference = run_cached_step(NumpyBackend(), encoder, inputs, NumpyInfoNCE(),
                                          chunk_size=2)
    assert loss == expected
    assert seen == [2, 2, 1] * 4   # two groups, both passes
    np.testing.assert_array_equal(grads[id(encoder)]["weight"], reference[id(encoder)]["weight"])
