"""Mixed precision and rematerialisation: bf16 compute with float32 parameters, bf16 parameters
(accumulated in float32), and ``jax.checkpoint`` inside the encoder."""

from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp

from gradcache_jax import cached_step
from tests.jax.common import batch, info_nce, jit, max_relative_error, tower, tower_params

BF16, F32 = jnp.bfloat16, jnp.float32


def bf16_tower(params, x):
    """float32 master parameters, bfloat16 compute: the usual mixed-precision encoder."""
    p = jax.tree_util.tree_map(lambda a: a.astype(BF16), params)
    return jnp.tanh(x.astype(BF16) @ p["w1"] + p["b1"]) @ p["w2"]


def f32_loss(q, d):
    return info_nce(q.astype(F32), d.astype(F32))


def test_bf16_compute_with_float32_params():
    params = tower_params(dtype=F32)
    q, d = batch(24, dtype=F32), batch(24, dtype=F32, seed=2)
    dtypes = []

    def loss(q, d):
        dtypes.append((q.dtype, d.dtype))
        return f32_loss(q, d)

    loss_value, grads = jit(lambda p, q, d: cached_step(bf16_tower, (q, d), loss, chunk_size=5,
                                                            params=p))(params, q, d)
    assert dtypes == [(BF16, BF16)], "the loss should see the encoder's bf16 representations"
    assert all(g.dtype == F32 for g in jax.tree_util.tree_leaves(grads))
    # the same bf16 computation on the full batch; chunking changes only the order of the sums
    ref = jit(jax.grad(lambda p: f32_loss(bf16_tower(p, q), bf16_tower(p, d))))(params)
    assert max_relative_error(grads, ref) <= 2e-2
    exact = jit(jax.grad(lambda p: info_nce(tower(p, q), tower(p, d))))(params)
    assert max_relative_error(grads, exact) <= 5e-2
    assert jnp.isfinite(loss_value)


def test_bf16_params_are_accumulated_in_float32():
    params = tower_params(dtype=BF16)
    q, d = batch(64, dtype=BF16), batch(64, dtype=BF16, seed=2)
    _, grads = jit(lambda p, q, d: cached_step(tower, (q, d), f32_loss, chunk_size=2,
                                                   params=p))(params, q, d)
    assert all(g.dtype == BF16 for g in jax.tree_util.tree_leaves(grads))
    # 32 chunks summed in bf16 would drift by several bf16 ulps; summed in f32 they stay close to
    # a float32 computation of the same bf16 numbers
    as_f32 = jax.tree_util.tree_map(lambda a: a.astype(F32), params)
    ref = jit(jax.grad(lambda p: f32_loss(tower(p, q.astype(F32)), tower(p, d.astype(F32)))))(
        as_f32)
    assert max_relative_error(grads, ref) <= 3e-2


def _count(jaxpr, name: str) -> int:
    total = sum(eqn.primitive.name == name for eqn in jaxpr.eqns)
    return total + sum(_count(sub, name) for eqn in jaxpr.eqns
                       for sub in jax.extend.core.jaxprs_in_params(eqn.params))


def test_jax_checkpoint_inside_the_encoder():
    def block(params, x):
        return jnp.tanh(x @ params["w1"] + params["b1"])

    params, q, d = tower_params(), batch(13), batch(13, seed=2)
    tanhs = {}
    for name, inner in (("plain", block), ("checkpointed", jax.checkpoint(block))):
        def encoder(params, x, inner=inner):
            return inner(params, x) @ params["w2"]

        def step(p, q, d, encoder=encoder):
            return cached_step(encoder, (q, d), info_nce, chunk_size=4, params=p)

        tanhs[name] = _count(jax.make_jaxpr(step)(params, q, d).jaxpr, "tanh")
        _, grads = jit(step)(params, q, d)
        ref = jit(jax.grad(lambda p, encoder=encoder: info_nce(encoder(p, q), encoder(p, d))))(
            params)
        assert max_relative_error(grads, ref) <= 1e-10, name
    # the checkpointed block is recomputed for its backward inside pass 2: more tanh evaluations
    assert tanhs["checkpointed"] > tanhs["plain"], tanhs
