"""``gradcache_tf.cached_loss`` beyond the contract suite: Keras ``train_step`` and ``fit`` (arrays,
``LossScaleOptimizer``), a frozen tower, ``get_rep(output, inputs)``, a second backward, no tape,
numpy inputs. Few traces: each test builds its models once."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import gradcache_tf
from gradcache import GradCacheError
from gradcache.testing.contract import relative_error
from tests.tf.test_keras import DIM, Linear, _close, _full, _pair, info_nce


def test_backward_twice_is_an_error_and_no_tape_takes_the_loss_alone() -> None:
    encoder, inputs = Linear(), _pair()
    calls = []

    def counted(x):
        calls.append(1)
        return encoder(x)
    with tf.GradientTape(persistent=True) as tape:
        loss = gradcache_tf.cached_loss(counted, inputs, info_nce, chunk_size=4,
                                        variables=[encoder.w])
    assert len(calls) == 6                      # pass 1 only (3 chunks a group), so far
    grads = tape.gradient(loss, [encoder.w])
    _close(grads, _full(encoder, inputs, info_nce, [encoder.w])[1])
    with pytest.raises(GradCacheError, match="already pulled back"):
        tape.gradient(loss, [encoder.w])
    calls.clear()
    alone = gradcache_tf.cached_loss(counted, inputs, info_nce, chunk_size=4,
                                     variables=[encoder.w])   # no tape: pass 1 and the loss
    assert len(calls) == 6 and abs(float(alone) - float(loss)) < 1e-12
    # numpy inputs, as the JAX adapter takes them
    with tf.GradientTape() as tape:
        loss = gradcache_tf.cached_loss(encoder, [x.numpy() for x in inputs], info_nce, chunk_size=4)
    _close(tape.gradient(loss, [encoder.w]), grads)


def test_frozen_tower_is_encoded_once_and_mean_pooling_takes_the_mask(keras) -> None:
    # LiT: a locked image tower, a trained text tower pooled over its attention mask
    image = keras.Sequential([keras.Input((DIM,)), keras.layers.Dense(3, dtype="float64")])
    text = keras.Sequential([keras.Input((5, DIM)), keras.layers.Dense(3, dtype="float64")])
    rng = np.random.default_rng(3)
    images = tf.constant(rng.normal(size=(12, DIM)))
    tokens = {"x": tf.constant(rng.normal(size=(12, 5, DIM))),
              "attention_mask": tf.constant((rng.random((12, 5)) > 0.3).astype("float64"))}
    calls = {"image": 0}

    class Counted(keras.layers.Layer):   # the locked tower, counting its calls
        def __init__(self, inner):
            super().__init__(dtype="float64")
            self.inner = inner

        def call(self, x):
            calls["image"] += 1
            return self.inner(x)
    locked = Counted(image)
    locked(images[:1])
    locked.trainable = False
    calls["image"] = 0

    class Text(tf.Module):
        def __call__(self, x, attention_mask):
            return text(x)

    def mean_pool(output, chunk):
        mask = chunk["attention_mask"][..., None]
        return tf.reduce_sum(output * mask, 1) / tf.reduce_sum(mask, 1)

    def pool(output, chunk=None):
        return output
    backend = gradcache_tf.TFBackend([], random=gradcache_tf.RandomSources([]))
    assert not backend.trains(locked) and not backend.trains(image) and backend.trains(text)
    assert backend.trains(lambda x: image(x))       # a plain callable: not known
    assert backend.trains(keras.layers.Dense(2))   # not built yet: it may still make variables
    text_module = Text()
    assert backend.trains(text_module)             # no variables of its own: may read others'
    with tf.GradientTape() as tape:
        loss = gradcache_tf.cached_loss([locked, text_module], (images, tokens), info_nce,
                                        chunk_size=4, get_rep=[pool, mean_pool],
                                        variables=text.trainable_variables)
    assert calls["image"] == 3                      # pass 1 only
    grads = tape.gradient(loss, text.trainable_variables)
    assert calls["image"] == 3                      # skipped in pass 2
    with tf.GradientTape() as tape:
        full = info_nce(image(images), mean_pool(text(tokens["x"]), tokens))
    for got, want in zip(grads, tape.gradient(full, text.trainable_variables), strict=True):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-10, atol=1e-14)  # bias: ~0
    assert abs(float(loss) - float(full)) < 1e-12


def test_keras_train_step_three_lines_and_loss_scale_optimizer(keras, mixed_precision) -> None:
    """A plain Keras 3 functional model with the usual custom ``train_step``; the cached one
    changes three lines, and under mixed_float16 the ``LossScaleOptimizer`` scales once."""
    def make(cached: bool):
        inputs = keras.Input((DIM,))
        hidden = keras.layers.Dense(16, activation="tanh",
                                    kernel_initializer=keras.initializers.GlorotUniform(1))(inputs)
        outputs = keras.layers.Dense(8, dtype="float32",
                                     kernel_initializer=keras.initializers.GlorotUniform(2))(hidden)

        class Contrastive(keras.Model):
            def train_step(self, data):
                queries, passages = data
                with tf.GradientTape() as tape:
                    if cached:   # the three changed lines: --------------------------------------
                        loss = gradcache_tf.cached_loss(self, (queries, passages), info_nce,
                                                        chunk_size=8, optimizer=self.optimizer)
                    else:        # the usual lines: -------------------------------------------------
                        loss = info_nce(self(queries, training=True), self(passages, training=True))
                    scaled = self.optimizer.scale_loss(loss)
                grads = tape.gradient(scaled, self.trainable_variables)
                self.optimizer.apply_gradients(zip(grads, self.trainable_variables))
                return {"loss": loss}
        model = Contrastive(inputs, outputs)
        model.compile(optimizer=keras.optimizers.SGD(0.1))
        return model
    models = [make(True), make(False)]
    assert isinstance(models[0].optimizer, keras.optimizers.LossScaleOptimizer)
    rng = np.random.default_rng(4)
    q, p = rng.normal(size=(2, 64, DIM)).astype("float32")
    data = tf.data.Dataset.from_tensor_slices((q, p)).batch(32, drop_remainder=True)
    histories = [m.fit(data, epochs=1, verbose=0, shuffle=False).history["loss"] for m in models]
    assert abs(histories[0][0] - histories[1][0]) < 1e-2
    for got, want in zip(models[0].trainable_variables, models[1].trainable_variables, strict=True):
        assert relative_error(got.numpy(), want.numpy()) < 2e-2  # float16 activations
    # the scale is applied once: the cached step's gradients are scale * the loss's gradient
    optimizer = models[0].optimizer
    with tf.GradientTape() as tape:
        loss = gradcache_tf.cached_loss(models[0], (q[:32], p[:32]), info_nce, chunk_size=8,
                                        optimizer=optimizer)
        scaled = optimizer.scale_loss(loss)
    cached = tape.gradient(scaled, models[0].trainable_variables)
    with tf.GradientTape() as tape:
        full = optimizer.scale_loss(info_nce(models[0](q[:32], training=True),
                                             models[0](p[:32], training=True)))
    expected = tape.gradient(full, models[0].trainable_variables)
    assert float(tf.reduce_max(tf.abs(cached[0]))) > 100.0
    _close(cached, expected, tolerance=2e-2)


def test_gradcache_model_fits_arrays_and_refuses_what_it_would_drop(keras) -> None:
    def make():
        return keras.Sequential([keras.Input((DIM,)), keras.layers.Dense(
            4, dtype="float64", kernel_initializer=keras.initializers.GlorotUniform(5))])
    rng = np.random.default_rng(6)
    q, p = rng.normal(size=(2, 32, DIM))
    fitted = {}
    for form in (tuple, list):
        encoder = make()
        model = gradcache_tf.GradCacheModel(encoder, info_nce, chunk_size=5)
        model.compile(optimizer=keras.optimizers.SGD(0.05))
        model.fit(x=form((q, p)), batch_size=16, epochs=1, verbose=0, shuffle=False)
        fitted[form] = [v.numpy() for v in encoder.trainable_variables]
    manual = make()
    optimizer = keras.optimizers.SGD(0.05)
    for start in (0, 16):
        _, grads = gradcache_tf.cached_step(manual, (q[start:start + 16], p[start:start + 16]),
                                            info_nce, chunk_size=5)
        optimizer.apply_gradients(zip(grads, manual.trainable_variables, strict=True))
    for form in (tuple, list):
        _close(fitted[form], [v.numpy() for v in manual.trainable_variables])
    assert np.isfinite(model.evaluate(x=(q, p), batch_size=16, verbose=0))
    with pytest.raises(GradCacheError, match="optimizer only, got metrics"):
        model.compile(optimizer="sgd", metrics=["accuracy"])
    with pytest.raises(GradCacheError, match="optimizer only, got loss"):
        model.compile(optimizer="sgd", loss="mse")
    with pytest.raises(GradCacheError, match="save what it trains: the encoders"):
        model.get_config()
