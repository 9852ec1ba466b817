"""Encoders of every kind (Keras models and layers, ``tf.Module``, plain callables), the
``training`` flag, variables found or given (loss-owned ones included), mixed precision with a
``LossScaleOptimizer``, ``GradCacheModel.fit``, and ``gradcache.cached_step`` routing TF tensors."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import gradcache
import gradcache_tf
from gradcache import GradCacheError
from gradcache.testing.contract import relative_error

ROWS, DIM = 10, 4


def _pair(dtype: str = "float64", rows: int = ROWS) -> tuple:
    rng = np.random.default_rng(0)
    return tuple(tf.constant(rng.normal(size=(rows, DIM)).astype(dtype)) for _ in range(2))


def info_nce(q, p):
    if q.dtype == tf.float16:  # mixed precision: the loss in float32
        q, p = tf.cast(q, tf.float32), tf.cast(p, tf.float32)
    scores = tf.matmul(q, p, transpose_b=True)
    return tf.reduce_mean(tf.reduce_logsumexp(scores, 1) - tf.linalg.diag_part(scores))


def _full(encoders, inputs, loss_fn, variables, call=lambda e, x: e(x)) -> tuple:
    encoders = encoders if isinstance(encoders, list) else [encoders] * len(inputs)
    with tf.GradientTape() as tape:
        loss = loss_fn(*[call(e, x) for e, x in zip(encoders, inputs, strict=True)])
    return loss, tape.gradient(loss, variables)


def _close(grads, expected, tolerance: float = 1e-10) -> None:
    assert len(grads) == len(expected)
    for got, want in zip(grads, expected, strict=True):
        assert (got is None) == (want is None)
        if got is not None:
            want = tf.convert_to_tensor(want)  # an embedding's full-batch gradient is IndexedSlices
            assert relative_error(np.asarray(got), want.numpy()) <= tolerance


class Linear(tf.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        self.w = tf.Variable(np.random.default_rng(seed).normal(size=(DIM, 3)))

    def __call__(self, x):
        return tf.tanh(x @ self.w)


def test_tf_module_and_plain_callables() -> None:
    module = Linear()
    inputs = _pair()
    weight = tf.Variable(np.random.default_rng(1).normal(size=(DIM, 3)))

    def closure(x):
        return tf.tanh(x @ weight)

    for encoder, variables in ((module, [module.w]), (closure, [weight]),
                               (module.__call__, [module.w])):
        assert gradcache_tf.trainable_variables(encoder) == variables
        _, grads = gradcache_tf.cached_step(encoder, inputs, info_nce, chunk_size=3)
        _, expected = _full(encoder, inputs, info_nce, variables)
        _close(grads, expected)


def test_separate_encoders_and_loss_owned_variable() -> None:
    class Temperature(tf.Module):
        def __init__(self):
            super().__init__()
            self.log_scale = tf.Variable(tf.constant(0.5, tf.float64))

        def __call__(self, q, p):
            return info_nce(q * tf.exp(self.log_scale), p)

    encoders, loss_fn, inputs = [Linear(0), Linear(1)], Temperature(), _pair()
    variables = gradcache_tf.trainable_variables(encoders, loss_fn)
    assert [id(v) for v in variables] == [id(encoders[0].w), id(encoders[1].w), id(loss_fn.log_scale)]
    _, grads = gradcache_tf.cached_step(encoders, inputs, loss_fn, chunk_size=4)
    _, expected = _full(encoders, inputs, loss_fn, variables)
    _close(grads, expected)


def test_variable_used_by_encoder_and_loss_gets_both_parts() -> None:
    encoder = Linear()
    shared = encoder.w

    def loss_fn(q, p):  # the loss reads the encoder's weight directly too
        return info_nce(q, p) + tf.reduce_sum(shared ** 2)
    _, grads = gradcache_tf.cached_step(encoder, _pair(), loss_fn, chunk_size=3, variables=[shared])
    _, expected = _full(encoder, _pair(), loss_fn, [shared])
    _close(grads, expected)


def test_explicit_variables_subset_and_duplicates() -> None:
    encoders, inputs = [Linear(0), Linear(1)], _pair()
    chosen = [encoders[1].w, encoders[0].w, encoders[1].w]
    _, grads = gradcache_tf.cached_step(encoders, inputs, info_nce, chunk_size=4, variables=chosen)
    _, expected = _full(encoders, inputs, info_nce, chosen)
    _close(grads, expected)
    frozen = tf.Variable(tf.ones((DIM, 3), tf.float64))  # not read by anything: no gradient
    _, grads = gradcache_tf.cached_step(encoders, inputs, info_nce, chunk_size=4,
                                        variables=[frozen, encoders[0].w])
    assert grads[0] is None and grads[1] is not None


GLOBAL_WEIGHT = {}


def _reads_a_global(x):
    return tf.tanh(x @ GLOBAL_WEIGHT["w"])


def test_unfound_variable_is_an_error() -> None:
    GLOBAL_WEIGHT["w"] = tf.Variable(tf.ones((DIM, 3), tf.float64), name="hidden_weight")
    other = Linear()
    with pytest.raises(GradCacheError, match="hidden_weight.*variables="):
        gradcache_tf.cached_step([other, _reads_a_global], _pair(), info_nce, chunk_size=4)
    with pytest.raises(GradCacheError, match="no trainable variables"):
        gradcache_tf.cached_step(_reads_a_global, _pair(), info_nce, chunk_size=4)
    _, grads = gradcache_tf.cached_step(_reads_a_global, _pair(), info_nce, chunk_size=4,
                                        variables=[GLOBAL_WEIGHT["w"]])
    assert grads[0] is not None


class TestKerasEncoders:
    @pytest.fixture(autouse=True)
    def _keras(self, keras) -> None:
        self.keras = keras

    def test_functional_model_with_dict_inputs_and_nested_outputs(self) -> None:
        keras = self.keras
        ids = keras.Input((DIM,), name="ids", dtype="float64")
        mask = keras.Input((DIM,), name="mask", dtype="float64")
        hidden = keras.layers.Dense(5, activation="tanh", dtype="float64")(
            keras.layers.Multiply(dtype="float64")([ids, mask]))
        model = keras.Model({"ids": ids, "mask": mask},
                            {"pooled": keras.layers.Dense(3, dtype="float64")(hidden),
                             "hidden": hidden})
        q, p = _pair()
        inputs = ({"ids": q, "mask": tf.ones_like(q)}, {"ids": p, "mask": tf.ones_like(p)})

        def pick(output):
            return output["pooled"]
        _, grads = gradcache_tf.cached_step(model, inputs, info_nce, chunk_size=3, get_rep=pick)
        _, expected = _full(model, inputs, info_nce, model.trainable_variables,
                            call=lambda e, x: pick(e(x, training=True)))
        _close(grads, expected)

    def test_embedding_gradients_in_a_loop(self) -> None:
        keras = self.keras
        model = keras.Sequential([keras.Input((6,), dtype="int32"),
                                  keras.layers.Embedding(50, 8, dtype="float64"),
                                  keras.layers.GlobalAveragePooling1D(dtype="float64"),
                                  keras.layers.Dense(3, dtype="float64")])
        rng = np.random.default_rng(1)
        inputs = tuple(tf.constant(rng.integers(0, 50, size=(20, 6)), tf.int32) for _ in range(2))
        step = tf.function(lambda q, p: gradcache_tf.cached_step(model, (q, p), info_nce,
                                                                 chunk_size=4))
        _, grads = step(*inputs)
        _, expected = _full(model, inputs, info_nce, model.trainable_variables)
        assert isinstance(expected[0], tf.IndexedSlices)
        _close(grads, expected)

    def test_frozen_layer_is_not_a_missed_variable(self) -> None:
        keras = self.keras
        model = keras.Sequential([keras.Input((DIM,)), keras.layers.Dense(5, dtype="float64"),
                                  keras.layers.Dense(3, dtype="float64")])
        model.layers[0].trainable = False  # its tf.Variables stay trainable=True underneath
        _, grads = gradcache_tf.cached_step(model, _pair(), info_nce, chunk_size=4)
        assert len(grads) == len(model.trainable_variables) == 2
        _, expected = _full(model, _pair(), info_nce, model.trainable_variables)
        _close(grads, expected)

    def test_lazily_built_sequential(self) -> None:
        keras = self.keras
        # float32: an unbuilt Sequential's first (building) call skips the input cast that later
        # calls make, so float64 inputs would see float32 rounding in pass 2 only.
        model = keras.Sequential([keras.layers.Dense(5, activation="tanh"), keras.layers.Dense(3)])
        assert not model.built
        loss, grads = gradcache_tf.cached_step(model, _pair("float32"), info_nce, chunk_size=4)
        assert len(grads) == len(model.trainable_variables) == 4
        _, expected = _full(model, _pair("float32"), info_nce, model.trainable_variables)
        _close(grads, expected, tolerance=1e-5)

    def test_training_flag(self) -> None:
        keras = self.keras
        seen = []

        class Recorder(keras.layers.Layer):
            def build(self, shape):
                self.w = self.add_weight(shape=(shape[-1], 3), dtype="float64")

            def call(self, x, training=None):
                seen.append(training)
                return x @ self.w

        layer = Recorder(dtype="float64")
        gradcache_tf.cached_step(layer, _pair(), info_nce, chunk_size=5)
        assert set(seen) == {True}
        seen.clear()
        gradcache_tf.cached_step(layer, _pair(), info_nce, chunk_size=5, training=False)
        assert set(seen) == {False}
        seen.clear()
        gradcache_tf.cached_step(layer, _pair(), info_nce, chunk_size=5, training=None)
        assert set(seen) == {None}

    def test_keras_layer_loss_with_learnable_temperature(self) -> None:
        keras = self.keras

        class ScaledInfoNCE(keras.layers.Layer):
            def build(self, *shapes):
                self.scale = self.add_weight(shape=(), initializer="ones", dtype="float64")

            def call(self, q, p):
                return info_nce(q * self.scale, p)

        loss_fn = ScaledInfoNCE(dtype="float64")
        encoder = keras.Sequential([keras.Input((DIM,)), keras.layers.Dense(3, dtype="float64")])
        inputs = _pair()
        loss_fn(*[encoder(x) for x in inputs])  # build it, so that its weight exists
        loss, grads = gradcache_tf.cached_step(encoder, inputs, loss_fn, chunk_size=4)
        variables = gradcache_tf.trainable_variables(encoder, loss_fn)
        assert len(variables) == 3 and variables[-1] is loss_fn.scale
        _, expected = _full(encoder, inputs, loss_fn, variables)
        _close(grads, expected)
        keras.optimizers.SGD(0.1).apply_gradients(zip(grads, variables, strict=True))

    def test_mixed_float16_with_loss_scale_optimizer(self, mixed_precision) -> None:
        keras = mixed_precision
        encoder = keras.Sequential([keras.Input((DIM,)), keras.layers.Dense(16, activation="tanh"),
                                    keras.layers.Dense(8, dtype="float32")])
        optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1))
        inputs = _pair("float32", rows=32)
        loss, grads = gradcache_tf.cached_step(encoder, inputs, info_nce, chunk_size=8,
                                               optimizer=optimizer)
        assert loss.dtype == tf.float32 and all(g.dtype == tf.float32 for g in grads)
        with tf.GradientTape() as tape:
            full = info_nce(*[encoder(x, training=True) for x in inputs])
            scaled = optimizer.scale_loss(full)
        expected = tape.gradient(scaled, encoder.trainable_variables)
        # scaled by 2**15, as apply_gradients expects; float16 activations bound the agreement
        assert float(tf.reduce_max(tf.abs(grads[0]))) > 100.0
        _close(grads, expected, tolerance=2e-2)
        before = [v.numpy().copy() for v in encoder.trainable_variables]
        optimizer.apply_gradients(zip(grads, encoder.trainable_variables, strict=True))
        moved = [np.abs(v.numpy() - b).max() for v, b in zip(encoder.trainable_variables, before, strict=True)]
        assert all(0 < m < 1 for m in moved)  # unscaled update: lr x O(1) gradients

    def test_gradcache_model_fit_matches_manual_steps(self) -> None:
        keras = self.keras

        def make():
            return keras.Sequential([keras.Input((DIM,)),
                                     keras.layers.Dense(8, activation="tanh", dtype="float64",
                                                        kernel_initializer=keras.initializers.GlorotUniform(1)),
                                     keras.layers.Dense(4, dtype="float64",
                                                        kernel_initializer=keras.initializers.GlorotUniform(2))])
        rng = np.random.default_rng(4)
        q, p = rng.normal(size=(2, 48, DIM))
        data = tf.data.Dataset.from_tensor_slices((q, p)).batch(16, drop_remainder=True)
        fitted, manual = make(), make()
        model = gradcache_tf.GradCacheModel(fitted, info_nce, chunk_size=5)
        model.compile(optimizer=keras.optimizers.SGD(0.05))
        history = model.fit(data, epochs=2, verbose=0, shuffle=False)
        assert history.history["loss"][1] < history.history["loss"][0]
        optimizer = keras.optimizers.SGD(0.05)
        for _ in range(2):
            for batch in data:
                _, grads = gradcache_tf.cached_step(manual, batch, info_nce, chunk_size=5)
                optimizer.apply_gradients(zip(grads, manual.trainable_variables, strict=True))
        _close([v.numpy() for v in fitted.trainable_variables],
               [v.numpy() for v in manual.trainable_variables])
        assert np.isfinite(model.evaluate(data, verbose=0))
        ragged = tf.data.Dataset.from_tensor_slices((q[:40], p[:40])).batch(16)
        with pytest.raises(GradCacheError, match="drop_remainder"):
            model.fit(ragged, epochs=1, verbose=0, shuffle=False)

    def test_gradcache_model_two_towers(self) -> None:
        keras = self.keras
        towers = [keras.Sequential([keras.Input((DIM,)), keras.layers.Dense(3)]) for _ in range(2)]
        model = gradcache_tf.GradCacheModel(towers, info_nce, chunk_size=4)
        model.compile(optimizer=keras.optimizers.SGD(0.1))
        q, p = np.random.default_rng(6).normal(size=(2, 16, DIM)).astype("float32")
        before = [v.numpy().copy() for v in model.trainable_variables]
        assert len(before) == 4
        model.fit(tf.data.Dataset.from_tensor_slices((q, p)).batch(8, drop_remainder=True),
                  epochs=1, verbose=0, shuffle=False)
        assert all(not np.array_equal(b, v.numpy())
                   for b, v in zip(before, model.trainable_variables, strict=True))
        reps = model((tf.constant(q), tf.constant(p)))
        assert [r.shape.as_list() for r in reps] == [[16, 3], [16, 3]]
        three = tf.data.Dataset.from_tensor_slices((q, p, p)).batch(8, drop_remainder=True)
        with pytest.raises(GradCacheError, match="2 encoders for 3 input groups"):
            model.fit(three, epochs=1, verbose=0, shuffle=False)

    def test_gradcache_model_dict_batches_and_mixed_precision(self, mixed_precision) -> None:
        keras = mixed_precision
        encoder = keras.Sequential([keras.Input((DIM,)), keras.layers.Dense(8, activation="relu"),
                                    keras.layers.Dropout(0.1, seed=1),
                                    keras.layers.Dense(4, dtype="float32")])

        def weighted(q, p, weight):
            return info_nce(q, p) * tf.reduce_mean(weight)
        model = gradcache_tf.GradCacheModel(encoder, weighted, chunk_size=4)
        model.compile(optimizer=keras.optimizers.Adam(1e-2))
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        rng = np.random.default_rng(5)
        q, p = rng.normal(size=(2, 32, DIM)).astype("float32")
        data = tf.data.Dataset.from_tensor_slices(
            {"groups": (q, p), "weight": np.ones(32, "float32")}).batch(16, drop_remainder=True)
        history = model.fit(data, epochs=2, verbose=0, shuffle=False)
        assert all(np.isfinite(history.history["loss"]))


def test_dispatcher_routes_tf_tensors() -> None:
    encoder = Linear()
    inputs = _pair()
    loss, grads = gradcache.cached_step(encoder, inputs, info_nce, chunk_size=3)
    _, expected = _full(encoder, inputs, info_nce, [encoder.w])
    _close(grads, expected)
    step = tf.function(lambda q, p: gradcache.cached_step(encoder, (q, p), info_nce, chunk_size=3))
    _, grads = step(*inputs)
    _close(grads, expected)
