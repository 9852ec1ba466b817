"""The step with the models people train in JAX: Flax NNX (split/merge), Flax Linen (``apply``),
Equinox modules, and optax applying the gradients inside a jitted train step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from gradcache_jax import cached_step, chunk_key
from tests.jax.common import batch, info_nce, jit, max_relative_error, tower, tower_params

optax = pytest.importorskip("optax")


def chunked_reference(encoder, inputs, loss, params, rng, chunk_size):
    """Loss of the chunk-by-chunk forward with the keys the step promises (differentiable)."""
    reps = []
    for group, x in enumerate(inputs):
        parts = [encoder(params, x[s:s + chunk_size], chunk_key(rng, group, i))
                 for i, s in enumerate(range(0, x.shape[0], chunk_size))]
        reps.append(jnp.concatenate(parts))
    return loss(*reps)


# -- Flax NNX ---------------------------------------------------------------------------------------
def test_flax_nnx_split_merge_with_dropout_and_optax():
    nnx = pytest.importorskip("flax.nnx")

    class Tower(nnx.Module):
        def __init__(self, rngs):
            self.dense = nnx.Linear(6, 8, param_dtype=jnp.float64, rngs=rngs)
            self.drop = nnx.Dropout(0.25, rngs=rngs)
            self.out = nnx.Linear(8, 4, param_dtype=jnp.float64, rngs=rngs)

        def __call__(self, x):
            return self.out(self.drop(jnp.tanh(self.dense(x))))

    model = Tower(nnx.Rngs(0, dropout=1))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def encoder(params, x, key):
        # The model is rebuilt inside the step (copy=True: fresh variables in the current trace,
        # which reseeding may mutate) and its dropout stream is reseeded with the chunk's key.
        module = nnx.merge(graphdef, params, rest, copy=True)
        nnx.reseed(module, dropout=key)
        return module(x)

    q, d, rng = batch(8), batch(8, seed=2), jax.random.PRNGKey(3)
    loss, grads = jit(lambda p, q, d, k: cached_step(encoder, (q, d), info_nce, chunk_size=4,
                                                         params=p, rng=k))(params, q, d, rng)
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(params)
    ref = jit(jax.grad(lambda p: chunked_reference(encoder, (q, d), info_nce, p, rng, 4)))(params)
    assert max_relative_error(grads, ref) <= 1e-10

    before = jnp.array(model.dense.kernel[...])
    tx = optax.adam(1e-2)
    updates, _ = tx.update(grads, tx.init(params), params)
    nnx.update(model, optax.apply_updates(params, updates))
    assert not jnp.allclose(model.dense.kernel[...], before)


# -- Flax Linen -------------------------------------------------------------------------------------
def test_flax_linen_apply_with_dropout():
    nn = pytest.importorskip("flax.linen")

    class Tower(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = True):
            h = jnp.tanh(nn.Dense(8, param_dtype=jnp.float64)(x))
            h = nn.Dropout(0.25, deterministic=not train)(h)
            return nn.Dense(4, param_dtype=jnp.float64)(h)

    model = Tower()
    q, d, rng = batch(8), batch(8, seed=2), jax.random.PRNGKey(4)
    variables = model.init(jax.random.PRNGKey(0), q[:1], train=False)

    def encoder(variables, x, key):
        return model.apply(variables, x, rngs={"dropout": key})

    _, grads = jit(lambda v, q, d, k: cached_step(encoder, (q, d), info_nce, chunk_size=4,
                                                      params=v, rng=k))(variables, q, d, rng)
    ref = jit(jax.grad(lambda v: chunked_reference(encoder, (q, d), info_nce, v, rng, 4)))(variables)
    assert max_relative_error(grads, ref) <= 1e-10


# -- Equinox ----------------------------------------------------------------------------------------
def test_equinox_module_as_params_with_filter_jit_and_optax():
    eqx = pytest.importorskip("equinox")
    model = eqx.nn.MLP(6, 4, 8, 2, activation=jnp.tanh, dtype=jnp.float64,
                       key=jax.random.PRNGKey(0))

    def encoder(model, x):
        return jax.vmap(model)(x)

    q, d = batch(11), batch(11, seed=2)
    _, grads = eqx.filter_jit(lambda m, q, d: cached_step(encoder, (q, d), info_nce, chunk_size=4,
                                                          params=m))(model, q, d)
    ref = eqx.filter_jit(eqx.filter_grad(lambda m: info_nce(encoder(m, q), encoder(m, d))))(model)
    # the module's functions (activations) are not arrays: their gradient is None, as filter_grad's
    assert grads.activation is None
    assert max_relative_error(eqx.filter(grads, eqx.is_array), eqx.filter(ref, eqx.is_array)) <= 1e-10

    tx = optax.sgd(0.1)
    updates, _ = tx.update(grads, tx.init(eqx.filter(model, eqx.is_array)))
    trained = eqx.apply_updates(model, updates)
    assert not jnp.allclose(trained.layers[0].weight, model.layers[0].weight)


# -- optax, in the user's jitted train step ---------------------------------------------------------
def test_optax_training_matches_full_batch_training():
    tx = optax.adamw(1e-2)
    q, d = batch(12), batch(12, seed=2)

    @jit
    def cached_train_step(params, opt_state, q, d):
        loss, grads = cached_step(tower, (q, d), info_nce, chunk_size=5, params=params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    @jit
    def full_train_step(params, opt_state, q, d):
        loss, grads = jax.value_and_grad(lambda p: info_nce(tower(p, q), tower(p, d)))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    cached = full = tower_params()
    cached_state = full_state = tx.init(full)
    for _ in range(3):
        cached, cached_state, cached_loss = cached_train_step(cached, cached_state, q, d)
        full, full_state, full_loss = full_train_step(full, full_state, q, d)
        assert abs(float(cached_loss) - float(full_loss)) <= 1e-10 * abs(float(full_loss))
    assert max_relative_error(cached, full) <= 1e-10
