"""What a wrong or unusual call gets from the JAX adapter: a Flax NNX module holding its own random
streams, a loss that gathers itself outside a distributed step. Each error case asserts the
exception type and that the message names the cause.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradcache import GradCacheError
from gradcache_jax import cached_loss, cached_step
from tests.jax.common import batch, info_nce, jit, max_relative_error, tower, tower_params

with jax.enable_x64(True):   # this folder's float64 is switched on per test; the batch is made now
    Q, D = batch(8), batch(8, seed=2)


# -- Flax NNX: a module holding nnx.Rngs passed as params ---------------------------------------------
@pytest.fixture(scope="module")
def nnx():
    return pytest.importorskip("flax.nnx")


def _tower(nnx):
    class Tower(nnx.Module):
        def __init__(self, rngs):
            self.dense = nnx.Linear(6, 8, param_dtype=jnp.float64, rngs=rngs)
            self.drop = nnx.Dropout(0.5, rngs=rngs)
            self.out = nnx.Linear(8, 4, param_dtype=jnp.float64, rngs=rngs)

        def __call__(self, x):
            return self.out(self.drop(jnp.tanh(self.dense(x))))

    return Tower(nnx.Rngs(0, dropout=1))


def _module_encoder(module, x):
    return module(x)


def _split_route(nnx, model):
    """The documented route on the same module, jitted: split, merge per chunk, reseed with the
    chunk's key, the step key being the dropout stream's next draw, ``fold_in(key, count)``;
    returns ``reference(model) -> (loss, kernel gradient)``."""
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)

    def encoder(params, x, key):
        module = nnx.merge(graphdef, params, rest, copy=True)
        nnx.reseed(module, dropout=key)
        return module(x)

    step = jit(lambda params, key: cached_step(encoder, (Q, D), info_nce, chunk_size=4,
                                               params=params, rng=key))

    def reference(model):
        stream = model.drop.rngs
        key = jax.random.fold_in(stream.key.get_value(), stream.count.get_value())
        loss, grads = step(nnx.state(model, nnx.Param), key)
        return float(loss), grads["dense"]["kernel"][...]

    return reference


def test_nnx_module_with_rngs_eagerly_draws_a_mask_per_chunk_and_advances(nnx):
    model = _tower(nnx)
    seen = []

    def capture(q, d):
        jax.debug.callback(lambda q: seen.append(np.asarray(q)), q)
        return info_nce(q, d)

    same_rows = jnp.broadcast_to(Q[:1], Q.shape)   # every chunk sees the same rows
    cached_step(_module_encoder, (same_rows, D), capture, chunk_size=4, params=model)
    assert not np.allclose(seen[0][:4], seen[0][4:])   # chunk 0 and chunk 1: different masks
    assert int(model.drop.rngs.count.get_value()) == 1   # the caller's stream advanced once


def test_nnx_module_with_rngs_equals_the_split_route_under_jit(nnx):
    model = _tower(nnx)
    reference = _split_route(nnx, model)

    @nnx.jit
    def loss_step(model):   # cached_loss differentiated by nnx, the module as it is
        def loss_of(model):
            return cached_loss(_module_encoder, (Q, D), info_nce, chunk_size=4)(model)

        return nnx.value_and_grad(loss_of)(model)

    @jax.jit
    def functional_step(model):   # plain jax.jit: the module's new state is returned
        loss, grads = cached_step(_module_encoder, (Q, D), info_nce, chunk_size=4, params=model)
        return loss, grads, model

    losses = []
    for _ in range(2):
        want, want_kernel = reference(model)
        loss, grads = loss_step(model)
        assert abs(float(loss) - want) <= 1e-12
        assert max_relative_error(grads.dense.kernel[...], want_kernel) <= 1e-10
        want, want_kernel = reference(model)
        loss, grads, model = functional_step(model)
        assert abs(float(loss) - want) <= 1e-12
        assert max_relative_error(grads.dense.kernel[...], want_kernel) <= 1e-10
        losses.append(float(loss))
    assert losses[0] != losses[1]
    assert int(model.drop.rngs.count.get_value()) == 4


def test_nnx_module_closed_over_by_jit_is_refused_naming_the_split_route(nnx):
    model = _tower(nnx)
    step = jax.jit(lambda q, d: cached_step(_module_encoder, (q, d), info_nce, chunk_size=4,
                                            params=model))
    with pytest.raises(GradCacheError, match=r"drop\.rngs.*nnx\.split\(model, nnx\.Param"):
        step(Q, D)
    assert int(model.drop.rngs.count.get_value()) == 0


# -- a loss that gathers itself, outside a distributed step -------------------------------------------
def test_across_ranks_outside_a_distributed_step_names_jax_spellings():
    from gradcache_jax.losses import across_ranks
    from gradcache_jax.losses import info_nce as tiled_info_nce

    loss = across_ranks(tiled_info_nce, axis_name="batch")
    for call in (lambda: cached_step(tower, (Q, D), loss, chunk_size=4, params=tower_params()),
                 lambda: cached_loss(tower, (Q, D), loss, chunk_size=4)):
        with pytest.raises(GradCacheError, match=r"distributed=mesh \(or True.*distributed='batch'"):
            call()
