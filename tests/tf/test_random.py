"""Random state: which sources are replayed (Keras seed generators, Keras' global generator,
``tf.random.Generator`` attributes and TF's global generator, ``random_state=``), and the clear
errors for those that cannot be (unfound generators, legacy stateful ops), plus the
``check_determinism`` route around them."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import gradcache_tf
from gradcache import GradCacheError
from gradcache.testing.contract import relative_error

ROWS, DIM = 12, 4


def _data() -> tuple:
    rng = np.random.default_rng(3)
    return tuple(tf.constant(rng.normal(size=(ROWS, DIM))) for _ in range(2))


def loss_fn(q, p):
    scores = tf.matmul(q, p, transpose_b=True)
    return tf.reduce_mean(tf.reduce_logsumexp(scores, 1) - tf.linalg.diag_part(scores))


class Noisy(tf.Module):
    """A linear map after multiplicative noise drawn by ``draw(shape, dtype)``."""

    def __init__(self, draw):
        super().__init__()
        self.weight = tf.Variable(np.random.default_rng(0).normal(size=(DIM, DIM)))
        self.draw = draw

    def __call__(self, x):
        return tf.tanh((x * self.draw(tf.shape(x), x.dtype)) @ self.weight)


def _chunked_reference(encoder, inputs, chunk: int, variables) -> list:
    with tf.GradientTape() as tape:
        reps = [tf.concat([encoder(x[i:i + chunk]) for i in range(0, ROWS, chunk)], 0)
                for x in inputs]
        loss = loss_fn(*reps)
    return tape.gradient(loss, variables)


def _assert_replays(encoder, reset, state, **options) -> None:
    """Cached grads equal the chunk-by-chunk reference with the same stream, which ends where
    that reference leaves it."""
    inputs = _data()
    reset()
    _, grads = gradcache_tf.cached_step(encoder, inputs, loss_fn, chunk_size=5, **options)
    after = state()
    reset()
    expected = _chunked_reference(encoder, inputs, 5, [encoder.weight])
    assert np.array_equal(after, state())
    assert relative_error(grads[0].numpy(), expected[0].numpy()) <= 1e-10
    # and the masks were random: the no-noise gradient differs
    plain = Noisy(lambda shape, dtype: tf.ones(shape, dtype))
    _, clean = gradcache_tf.cached_step(plain, inputs, loss_fn, chunk_size=5)
    assert relative_error(grads[0].numpy(), clean[0].numpy()) > 1e-6


def test_generator_attribute_is_replayed() -> None:
    generator = tf.random.Generator.from_seed(1)
    encoder = Noisy(lambda shape, dtype: generator.uniform(shape, dtype=dtype))
    encoder.generator = generator  # an attribute: found by the search
    _assert_replays(encoder, lambda: generator.reset_from_seed(1), lambda: generator.state.numpy())


def test_generator_in_a_closure_is_replayed() -> None:
    generator = tf.random.Generator.from_seed(2)
    encoder = Noisy(lambda shape, dtype: generator.normal(shape, dtype=dtype))  # closure cell
    _assert_replays(encoder, lambda: generator.reset_from_seed(2), lambda: generator.state.numpy())


def test_global_tf_generator_is_replayed() -> None:
    def draw(shape, dtype):
        return tf.random.get_global_generator().uniform(shape, dtype=dtype)
    encoder = Noisy(draw)
    previous = tf.random.get_global_generator()
    tf.random.set_global_generator(tf.random.Generator.from_seed(5))
    try:
        _assert_replays(encoder, lambda: tf.random.get_global_generator().reset_from_seed(5),
                        lambda: tf.random.get_global_generator().state.numpy())
    finally:
        tf.random.set_global_generator(previous)


HIDDEN = {}


def _hidden_draw(shape, dtype):
    # reaches its generator through a module global: nothing on the encoder leads there
    return HIDDEN["generator"].uniform(shape, dtype=dtype)


def test_unfound_generator_is_an_error_and_random_state_fixes_it() -> None:
    HIDDEN["generator"] = tf.random.Generator.from_seed(3)
    encoder = Noisy(_hidden_draw)
    with pytest.raises(GradCacheError, match="did not find.*random_state"):
        gradcache_tf.cached_step(encoder, _data(), loss_fn, chunk_size=5)
    generator = HIDDEN["generator"]
    _assert_replays(encoder, lambda: generator.reset_from_seed(3), lambda: generator.state.numpy(),
                    random_state=[generator])


@pytest.mark.parametrize("eager", [True, False])
def test_legacy_stateful_op_is_an_error(eager: bool) -> None:
    encoder = Noisy(lambda shape, dtype: tf.random.uniform(shape, dtype=dtype))

    def step(q, p):
        return gradcache_tf.cached_step(encoder, (q, p), loss_fn, chunk_size=5)
    with pytest.raises(GradCacheError, match="RandomUniform.*cannot be replayed"):
        (step if eager else tf.function(step))(*_data())


def test_nn_dropout_is_an_error() -> None:
    class Legacy(tf.Module):
        def __init__(self):
            self.weight = tf.Variable(tf.ones((DIM, DIM), tf.float64))

        def __call__(self, x):
            return tf.nn.dropout(x, rate=0.5) @ self.weight
    with pytest.raises(GradCacheError, match="stateful random op"):
        gradcache_tf.cached_step(Legacy(), _data(), loss_fn, chunk_size=5)


@pytest.mark.parametrize("eager", [True, False])
def test_check_determinism_catches_what_cannot_be_replayed(eager: bool) -> None:
    encoder = Noisy(lambda shape, dtype: tf.random.uniform(shape, dtype=dtype))

    def step(q, p):
        return gradcache_tf.cached_step(encoder, (q, p), loss_fn, chunk_size=5, check_random=False,
                                        check_determinism=True)
    if eager:
        with pytest.raises(GradCacheError, match="differs from pass 1"):
            step(*_data())
    else:
        with pytest.raises(tf.errors.InvalidArgumentError, match="differs from pass 1"):
            tf.function(step)(*_data())


def test_check_determinism_passes_when_replayed() -> None:
    generator = tf.random.Generator.from_seed(4)
    encoder = Noisy(lambda shape, dtype: generator.uniform(shape, dtype=dtype))
    step = tf.function(lambda q, p: gradcache_tf.cached_step(encoder, (q, p), loss_fn, chunk_size=3,
                                                             check_determinism=True))
    loss, _ = step(*_data())
    assert np.isfinite(loss.numpy())


def test_stateless_ops_need_nothing() -> None:
    encoder = Noisy(lambda shape, dtype: tf.random.stateless_uniform(shape, (1, 2), dtype=dtype))
    inputs = _data()
    _, grads = gradcache_tf.cached_step(encoder, inputs, loss_fn, chunk_size=5)
    expected = _chunked_reference(encoder, inputs, 5, [encoder.weight])
    assert relative_error(grads[0].numpy(), expected[0].numpy()) <= 1e-10


class TestKeras:
    @pytest.fixture(autouse=True)
    def _keras(self, keras) -> None:
        self.keras = keras

    def _model(self, rate: float = 0.5):
        keras = self.keras
        return keras.Sequential([
            keras.Input((DIM,)),
            keras.layers.Dense(6, activation="tanh", dtype="float64"),
            keras.layers.Dropout(rate, seed=11, dtype="float64"),
            keras.layers.GaussianNoise(0.3, seed=12, dtype="float64"),
            keras.layers.Dense(3, dtype="float64"),
        ])

    def test_dropout_and_noise_layers_are_replayed(self) -> None:
        model = self._model()
        states = [layer.seed_generator.state for layer in model.layers[1:3]]
        start = [s.numpy().copy() for s in states]
        inputs = _data()
        _, grads = gradcache_tf.cached_step(model, inputs, loss_fn, chunk_size=5)
        after = [s.numpy().copy() for s in states]
        for state, value in zip(states, start, strict=True):
            state.assign(value)
        with tf.GradientTape() as tape:
            reps = [tf.concat([model(x[i:i + 5], training=True) for i in range(0, ROWS, 5)], 0)
                    for x in inputs]
            loss = loss_fn(*reps)
        expected = tape.gradient(loss, model.trainable_variables)
        assert all(np.array_equal(a, s.numpy()) for a, s in zip(after, states, strict=True))
        assert not np.array_equal(after[0], start[0])
        for got, want in zip(grads, expected, strict=True):
            assert relative_error(got.numpy(), want.numpy()) <= 1e-10

    def test_unseeded_keras_random_uses_the_global_generator(self) -> None:
        keras = self.keras

        class Unseeded(keras.layers.Layer):
            def call(self, x, training=False):
                return keras.random.dropout(x, 0.5) if training else x  # seed=None: global

        model = keras.Sequential([keras.Input((DIM,)), Unseeded(dtype="float64"),
                                  keras.layers.Dense(3, dtype="float64")])
        inputs = _data()
        step = tf.function(lambda q, p: gradcache_tf.cached_step(model, (q, p), loss_fn, chunk_size=5,
                                                                 check_determinism=True))
        loss, grads = step(*inputs)
        assert np.isfinite(loss.numpy()) and all(g is not None for g in grads)

    def test_seed_generator_outside_the_model_needs_random_state(self) -> None:
        HIDDEN["seed_generator"] = self.keras.random.SeedGenerator(3)
        HIDDEN["weight"] = weight = tf.Variable(tf.ones((DIM, 3), tf.float64))
        with pytest.raises(GradCacheError, match="SeedGenerator"):
            gradcache_tf.cached_step(_hidden_keras_encode, _data(), loss_fn, chunk_size=5,
                                     variables=[weight])
        _, grads = gradcache_tf.cached_step(_hidden_keras_encode, _data(), loss_fn, chunk_size=5,
                                            variables=[weight], random_state=[HIDDEN["seed_generator"]],
                                            check_determinism=True)
        assert grads[0] is not None


def _hidden_keras_encode(x):
    import keras
    return keras.random.dropout(x, 0.5, seed=HIDDEN["seed_generator"]) @ HIDDEN["weight"]
