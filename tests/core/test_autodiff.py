"""The core's skeletons of the loss's gradient and of pass 2's pullback, on numpy backends.

They hold for every adapter at once: the loss is differentiated (scaled by the backend's loss scale)
with respect to the floating-point representation leaves only, the others get zeros of their own
dtype; a loss's own gradient is scaled the same way and must match the representations; an encoder
whose output structure changes between the passes is named with its chunk.
"""

from __future__ import annotations

import numpy as np
import pytest

from gradcache import GradCacheError, cached_forward, run_cached_step
from gradcache.testing import LinearEncoder, NumpyBackend, NumpyInfoNCE


class FiniteDifferences(NumpyBackend):
    """Differentiates by central differences (exact for the quadratic losses below), times 4."""

    def __init__(self):
        super().__init__()
        self.seen: list = []

    def scale_loss(self, value):
        return value * 4.0

    def value_and_grad(self, fn, values, grads):
        self.seen.append([v.dtype for v in values])
        value = fn(values)[1]
        gradients = []
        for i, leaf in enumerate(values):
            gradient = np.zeros_like(leaf)
            for index in np.ndindex(leaf.shape):
                step = np.zeros_like(leaf)
                step[index] = 0.5
                up = fn(values[:i] + [leaf + step] + values[i + 1:])[0]
                down = fn(values[:i] + [leaf - step] + values[i + 1:])[0]
                gradient[index] = up - down
            gradients.append(gradient)
        return value, gradients, grads


def _encoder(x):
    return {"emb": x @ np.eye(3), "ids": np.arange(len(x))}


def test_the_loss_is_differentiated_at_floating_leaves_and_scaled() -> None:
    rng = np.random.default_rng(0)
    inputs = (rng.normal(size=(5, 3)), rng.normal(size=(4, 3)))
    backend = FiniteDifferences()

    def loss(a, b):
        return np.sum(a["emb"] ** 2) + 3.0 * np.sum(b["emb"])

    forward = cached_forward(backend, _encoder, inputs, loss, chunk_size=2)
    assert backend.seen == [[np.dtype("float64")] * 2]   # the integer leaves are not differentiated
    first, second = forward.rep_grads
    np.testing.assert_allclose(first["emb"], 4 * 2 * inputs[0], atol=1e-9)
    np.testing.assert_allclose(second["emb"], np.full((4, 3), 4 * 3.0), atol=1e-9)
    for grad, rows in ((first, 5), (second, 4)):
        assert grad["ids"].dtype == np.arange(1).dtype and not grad["ids"].any()
        assert grad["ids"].shape == (rows,)
    assert forward.loss == loss(*[_encoder(x) for x in inputs])
    forward.close()


def test_a_supplied_gradient_is_scaled_and_must_match_the_representations() -> None:
    rng = np.random.default_rng(1)
    encoder = LinearEncoder(rng.normal(size=(3, 2)))
    inputs = (rng.normal(size=(4, 3)), rng.normal(size=(4, 3)))
    plain = cached_forward(NumpyBackend(), encoder, inputs, NumpyInfoNCE(), chunk_size=2)
    scaled = cached_forward(FiniteDifferences(), encoder, inputs, NumpyInfoNCE(), chunk_size=2)
    for a, b in zip(plain.rep_grads, scaled.rep_grads):
        np.testing.assert_allclose(b, 4 * a, rtol=1e-12)

    class Short(NumpyInfoNCE):
        def value_and_grad(self, *reps):
            loss, grads = super().value_and_grad(*reps)
            return loss, grads[:1]

    with pytest.raises(GradCacheError, match="returned 1 gradient tensors for 2 representation"):
        run_cached_step(NumpyBackend(), encoder, inputs, Short(), chunk_size=2)


def test_an_output_structure_changing_between_passes_names_the_chunk() -> None:
    rng = np.random.default_rng(2)
    inner = LinearEncoder(rng.normal(size=(3, 2)))
    calls = {"n": 0}

    def encoder(x):
        calls["n"] += 1
        out = inner(x)
        return [out, out] if calls["n"] > 3 else [out]   # pass 1 ran chunks 0-2; pass 2 differs

    class SumLoss:
        def value_and_grad(self, rep):
            return np.sum(rep[0]), [[np.ones_like(rep[0])]]

    encoder.vjp = lambda x, g: inner.vjp(x, g)
    with pytest.raises(GradCacheError,
                       match=r"group 0, chunk 0 \(pass 2\): the encoder returned 2 tensors in "
                             r"pass 2 but 1 in pass 1"):
        run_cached_step(NumpyBackend(), encoder, (rng.normal(size=(6, 3)),), SumLoss(),
                        chunk_size=2)
