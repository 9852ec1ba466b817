"""What a failing or wrong call leaves behind in TensorFlow: a failed check inside ``tf.function``
puts the random streams back (as eagerly), a loss with no gradient path is refused, a gradient of
the cached gradient (a nested tape, a gradient penalty) raises instead of missing terms, and what an
adversarial pass over ``cached_loss`` found. Each case asserts the exception type and that the
message names the cause. Few traces: each test builds its functions once."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import gradcache_tf
from gradcache import GradCacheError

ROWS, DIM = 12, 5


class Dropout(tf.Module):
    """A linear tower with dropout drawn from its own ``tf.random.Generator`` (a replayed stream)
    and, optionally, a call counter that makes pass 2 differ from pass 1."""

    def __init__(self, drifting: bool = False):
        super().__init__()
        rng = np.random.default_rng(0)
        self.w = tf.Variable(rng.normal(size=(DIM, 3)))
        self.generator = tf.random.Generator.from_seed(5)
        self.calls = tf.Variable(0.0, dtype=tf.float64, trainable=False)
        self.drifting = drifting

    def __call__(self, x):
        keep = tf.cast(self.generator.uniform(tf.shape(x), dtype=tf.float64) > 0.3, tf.float64)
        out = (x * keep / 0.7) @ self.w
        if self.drifting:
            out += 1e-3 * self.calls.assign_add(1.0)
        return out


def info_nce(q, p):
    scores = tf.matmul(q, p, transpose_b=True)
    labels = tf.range(tf.shape(q)[0])
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, scores))


def _pair() -> tuple:
    rng = np.random.default_rng(1)
    return tf.constant(rng.normal(size=(ROWS, DIM))), tf.constant(rng.normal(size=(ROWS, DIM)))


def _not_finite(q, p):
    return info_nce(q, p) * np.inf


# -- a failed check inside tf.function ------------------------------------------------------------------
def test_a_failed_check_in_tf_function_puts_the_random_streams_back() -> None:
    q, p = _pair()
    encoder, drifting = Dropout(), Dropout(drifting=True)

    @tf.function
    def step(q, p, check):
        return gradcache_tf.cached_step(encoder, (q, p), _not_finite if check else info_nce,
                                        chunk_size=4, check_finite=check)

    @tf.function
    def loss_step(q, p):
        with tf.GradientTape() as tape:
            loss = gradcache_tf.cached_loss(encoder, (q, p), _not_finite, chunk_size=4,
                                            check_finite=True)
        return tape.gradient(loss, [encoder.w])

    @tf.function
    def drifting_step(q, p):   # 3 chunks a group: pass 2's check runs inside the tf.while_loop
        return gradcache_tf.cached_step(drifting, (q, p), info_nce, chunk_size=4,
                                        check_determinism=True)

    for call, model, match in ((lambda: step(q, p, True), encoder, "loss is not finite"),
                               (lambda: loss_step(q, p), encoder, "loss is not finite"),
                               (drifting_step_call := lambda: drifting_step(q, p), drifting,
                                r"chunk 0 \(pass 2\).*differs")):
        before = model.generator.state.numpy()
        with pytest.raises(tf.errors.InvalidArgumentError, match=match):
            call()
        np.testing.assert_array_equal(model.generator.state.numpy(), before)
    del drifting_step_call
    before = encoder.generator.state.numpy()
    step(q, p, False)                  # a step that succeeds advances the stream, once
    assert not np.array_equal(encoder.generator.state.numpy(), before)


# -- a loss without a gradient path -------------------------------------------------------------------
def _detached(q, p):
    return tf.stop_gradient(info_nce(q, p))


def _integer_valued(q, p):
    return tf.cast(tf.reduce_sum(tf.cast(tf.matmul(q, p, transpose_b=True) > 0, tf.int32)),
                   tf.float64)


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "tf.function"])
def test_a_loss_with_no_gradient_path_is_an_error(graph: bool) -> None:
    encoder, (q, p) = Dropout(), _pair()

    def step(loss_fn):
        return gradcache_tf.cached_step(encoder, (q, p), loss_fn, chunk_size=4)

    def loss_step(loss_fn):
        with tf.GradientTape() as tape:
            loss = gradcache_tf.cached_loss(encoder, (q, p), loss_fn, chunk_size=4)
        return tape.gradient(loss, [encoder.w])

    for run in (step, loss_step):
        for loss_fn in (_detached, _integer_valued):
            call = tf.function(lambda: run(loss_fn)) if graph else lambda: run(loss_fn)  # noqa: B023
            with pytest.raises(GradCacheError, match="does not depend on the representations"):
                call()


# -- a gradient of the cached gradient ----------------------------------------------------------------
def test_a_gradient_of_the_cached_gradient_raises_instead_of_missing_terms() -> None:
    encoder, (q, p) = Dropout(), _pair()
    with tf.GradientTape() as outer:
        with tf.GradientTape() as inner:
            loss = gradcache_tf.cached_loss(encoder, (q, p), info_nce, chunk_size=4)
        (grad,) = inner.gradient(loss, [encoder.w])
        penalty = tf.reduce_sum(grad ** 2)
    with pytest.raises(LookupError, match="first-order gradients only"):
        outer.gradient(penalty, [encoder.w])
    with tf.GradientTape() as outer:   # a gradient penalty over cached_step
        _, (grad,) = gradcache_tf.cached_step(encoder, (q, p), info_nce, chunk_size=4)
        penalty = tf.reduce_sum(grad ** 2)
    with pytest.raises(LookupError, match="first-order gradients only"):
        outer.gradient(penalty, [encoder.w])
    # a persistent tape asked inside its own block still gives the first-order gradient
    with tf.GradientTape(persistent=True) as tape:
        loss = gradcache_tf.cached_loss(encoder, (q, p), info_nce, chunk_size=4)
        (grad,) = tape.gradient(loss, [encoder.w])
    assert grad.shape == encoder.w.shape



@pytest.mark.parametrize("graph", [False, True], ids=["eager", "tf.function"])
def test_the_loss_cached_step_returns_carries_no_gradient_to_an_outer_tape(graph: bool) -> None:
    """The loss is a value, as in torch: a tape recording around the step differentiates neither the
    encoder (its representations came from pass 1, which no tape records) nor a loss's own
    temperature through it -- that gradient is in the step's gradients already."""
    encoder, (q, p) = Dropout(), _pair()
    temperature = tf.Variable(2.0, dtype=q.dtype)

    def scaled(q, p):
        return info_nce(q, p) * temperature

    def run():
        with tf.GradientTape() as outer:
            loss, _ = gradcache_tf.cached_step(encoder, (q, p), scaled, chunk_size=4,
                                               variables=[encoder.w, temperature])
        return outer.gradient(loss, [encoder.w, temperature])

    assert (tf.function(run) if graph else run)() == [None, None]

# -- cached_loss, tried adversarially -----------------------------------------------------------------
def test_variables_changed_between_the_call_and_the_gradient_are_caught_by_check_determinism() -> None:
    encoder, (q, p) = Dropout(), _pair()
    with tf.GradientTape() as tape:
        loss = gradcache_tf.cached_loss(encoder, (q, p), info_nce, chunk_size=4,
                                        check_determinism=True)
    encoder.w.assign_add(tf.ones_like(encoder.w))   # an optimizer step before the gradient
    with pytest.raises(GradCacheError, match=r"chunk 0 \(pass 2\).*differs"):
        tape.gradient(loss, [encoder.w])


def test_a_second_gradient_inside_tf_function_is_a_gradcache_error() -> None:
    encoder, (q, p) = Dropout(), _pair()

    @tf.function
    def twice(q, p):
        with tf.GradientTape(persistent=True) as tape:
            loss = gradcache_tf.cached_loss(encoder, (q, p), info_nce, chunk_size=4)
        tape.gradient(loss, [encoder.w])
        return tape.gradient(loss, [encoder.w])

    with pytest.raises(GradCacheError, match="already pulled back"):
        twice(q, p)
