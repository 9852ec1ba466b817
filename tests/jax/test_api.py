"""The public surface of ``gradcache_jax``: loss-owned parameters, loss arguments, ``get_rep``,
parameters that are not trained, numpy batches, and the core's ``gradcache.cached_step`` routing
JAX arrays here."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradcache
import gradcache_jax
from gradcache_jax import cached_step
from tests.jax.common import batch, info_nce, jit, max_relative_error, tower, tower_params


def test_public_names():
    assert set(gradcache_jax.__all__) == {"GradCacheError", "JaxBackend", "MeshCollective",
                                        "ShardedJaxBackend", "cached_loss", "cached_step", "chunk_key",
                                        "unwrap_check_errors"}
    assert gradcache_jax.GradCacheError is gradcache.GradCacheError


def test_float64_is_on_only_inside_this_folder():
    from jax._src import config as jax_config  # the global value, under the tests' local context

    assert jnp.zeros(()).dtype == jnp.float64
    assert jax_config.enable_x64.get_global() is False


def test_loss_owned_parameters_get_their_gradient_once():
    params = {**tower_params(), "log_temp": jnp.asarray(0.3)}
    q, d = batch(13), batch(13, seed=2)
    seen = []

    def loss(params, q, d, *, margin):
        seen.append(sorted(params))
        scores = q @ d.T / jnp.exp(params["log_temp"]) - margin
        return jnp.mean(jax.nn.logsumexp(scores, axis=1) - jnp.diagonal(scores))

    step = jit(lambda p, q, d: cached_step(tower, (q, d), loss, chunk_size=4, params=p,
                                               loss_takes_params=True,
                                               loss_kwargs={"margin": 0.1}))
    value, grads = step(params, q, d)
    assert seen == [["b1", "log_temp", "w1", "w2"]]  # the whole params tree, traced once
    ref_value, ref = jit(jax.value_and_grad(
        lambda p: loss(p, tower(p, q), tower(p, d), margin=0.1)))(params)
    assert abs(float(value) - float(ref_value)) <= 1e-12
    # counted once, not once per chunk or per group
    assert max_relative_error(grads, ref) <= 1e-10


def test_loss_params_are_only_for_the_loss():
    backend = gradcache_jax.JaxBackend({"w": jnp.ones(2)})
    with pytest.raises(gradcache.GradCacheError, match="outside of the step's loss"):
        backend.loss_params()


def test_get_rep_per_group_and_nested_outputs():
    params = tower_params()
    q, d = batch(9), {"x": batch(9, seed=2), "mask": jnp.ones((9,))}

    def query_encoder(p, x):
        return {"pooled": tower(p, x), "tokens": jnp.stack([x, x], axis=1)}

    def passage_encoder(p, x):
        return tower(p, x["x"]) * x["mask"][:, None]

    _, grads = jit(lambda p, q, d: cached_step(
        [query_encoder, passage_encoder], (q, d), info_nce, chunk_size=[4, 2], params=p,
        get_rep=[lambda out: out["pooled"], None]))(params, q, d)
    ref = jax.grad(lambda p: info_nce(tower(p, q), tower(p, d["x"])))(params)
    assert max_relative_error(grads, ref) <= 1e-10


def test_untrained_leaves_get_none_and_are_passed_through():
    params = {**tower_params(), "vocab_size": jnp.asarray(7), "note": "not an array"}
    q, d = batch(8), batch(8, seed=2)

    def encoder(p, x):
        assert p["note"] == "not an array"
        return tower(p, x) * (p["vocab_size"] / 7)

    # the string cannot be a jit argument: the params tree is completed inside the traced function
    _, grads = jit(lambda arrays, q, d: cached_step(
        encoder, (q, d), info_nce, chunk_size=3, params={**arrays, "note": params["note"]}))(
        {k: v for k, v in params.items() if k != "note"}, q, d)
    assert grads["vocab_size"] is None and grads["note"] is None
    ref = jax.grad(lambda p: info_nce(tower(p, q), tower(p, d)))(tower_params())
    assert max_relative_error({k: grads[k] for k in ref}, ref) <= 1e-10


def test_numpy_batches_and_a_loss_that_supplies_its_gradient():
    params = tower_params()
    q, d = np.asarray(batch(10)), np.asarray(batch(10, seed=2))

    class HandWritten:
        """A loss with its own value_and_grad (as the tiled losses have); used as given."""

        calls = 0

        def __call__(self, q, d):
            return info_nce(q, d)

        def value_and_grad(self, q, d):
            HandWritten.calls += 1
            value, grads = jax.value_and_grad(info_nce, argnums=(0, 1))(q, d)
            return value, list(grads)

    _, grads = cached_step(tower, (q, d), HandWritten(), chunk_size=4, params=params)
    assert HandWritten.calls == 1
    ref = jax.grad(lambda p: info_nce(tower(p, q), tower(p, d)))(params)
    assert max_relative_error(grads, ref) <= 1e-10


def test_encoder_count_mismatch_is_a_gradcache_error():
    with pytest.raises(gradcache.GradCacheError, match="3 encoders for 2 input groups"):
        cached_step([tower] * 3, (batch(4), batch(4)), info_nce, chunk_size=2, params=tower_params())


# -- the core's entry point ---------------------------------------------------------------------------
def test_core_cached_step_dispatches_jax_arrays_here():
    params, q, d = tower_params(), batch(10), batch(10, seed=2)
    direct = jit(lambda p, q, d: cached_step(tower, (q, d), info_nce, chunk_size=4,
                                                 params=p))(params, q, d)
    routed = jit(lambda p, q, d: gradcache.cached_step(tower, (q, d), info_nce, chunk_size=4,
                                                           params=p))(params, q, d)
    assert max_relative_error(routed, direct) == 0.0


def test_core_cached_step_dispatches_numpy_batches_with_params_here():
    params, q, d = tower_params(), batch(10), batch(10, seed=2)
    ref = jax.grad(lambda p: info_nce(tower(p, q), tower(p, d)))(params)
    _, from_numpy = gradcache.cached_step(tower, (np.asarray(q), np.asarray(d)), info_nce,
                                          chunk_size=4, params=params)
    assert max_relative_error(from_numpy, ref) <= 1e-10
