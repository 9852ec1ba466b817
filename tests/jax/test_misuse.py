"""What a wrong or unusual call gets from the JAX adapter: a Flax NNX module holding its own random
streams, a loss that gathers itself outside a distributed step, a check failing under ``jit``, and
what an adversarial pass over ``cached_loss`` found (an integer-valued loss, a malformed key) or
confirmed (gradients of the cached gradient and ``vmap`` are exact). Each error case asserts the
exception type and that the message names the cause.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradcache import GradCacheError
from gradcache_jax import cached_loss, cached_step, unwrap_check_errors
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


# -- checks failing under jit -------------------------------------------------------------------------
def _nan_loss(q, d):
    return info_nce(q, d) * jnp.nan


def test_a_check_failing_under_jit_unwraps_to_its_gradcache_error(caplog):
    step = jit(lambda p: cached_step(tower, (Q, D), _nan_loss, chunk_size=4, params=p,
                                     check_finite=True))
    with caplog.at_level(logging.ERROR, logger="jax._src.debugging"):
        with pytest.raises(jax.errors.JaxRuntimeError, match="not finite"):   # jaxlib's wrapping
            jax.block_until_ready(step(tower_params()))
        with pytest.raises(GradCacheError, match="^the loss is not finite") as caught:
            with unwrap_check_errors():
                jax.block_until_ready(step(tower_params()))
    assert isinstance(caught.value.__cause__, jax.errors.JaxRuntimeError)
    assert "debug.callback failed" not in caplog.text   # the message is not logged a second time

    with pytest.raises(ZeroDivisionError):   # anything else passes through unchanged
        with unwrap_check_errors():
            raise ZeroDivisionError


def test_check_determinism_failing_under_jit_through_cached_loss_unwraps():
    def noisy(p, x, key):   # a mask from a key the replay does not see
        return tower(p, x) * jax.random.bernoulli(jax.random.fold_in(key, x.shape[0] + key_bump()),
                                                  0.5, (x.shape[0], 4))

    bumps = iter(range(1000))

    def key_bump():
        return next(bumps)   # a different Python int at every trace: pass 2 is traced anew

    f = cached_loss(noisy, (Q, D), info_nce, chunk_size=4, rng=jax.random.PRNGKey(0),
                    check_determinism=True)
    with pytest.raises(GradCacheError, match=r"^group 0, chunk \d \(pass 2\).*differs"):
        with unwrap_check_errors():
            jax.block_until_ready(jit(jax.grad(f))(tower_params()))


# -- cached_loss, tried adversarially -----------------------------------------------------------------
def test_an_integer_valued_loss_is_a_gradcache_error():
    def count(q, d):
        return jnp.sum(q @ d.T > 0)

    with pytest.raises(GradCacheError, match="does not depend on the representations.*integer"):
        jax.grad(cached_loss(tower, (Q, D), count, chunk_size=4))(tower_params())
    with pytest.raises(GradCacheError, match="does not depend on the representations.*integer"):
        cached_step(tower, (Q, D), count, chunk_size=4, params=tower_params())
    # without a gradient the loss alone is taken, as jax would
    assert int(cached_loss(tower, (Q, D), count, chunk_size=4)(tower_params())) >= 0


@pytest.mark.parametrize("rng, what", [
    (3, "int 3"),
    (np.zeros(2), "dtype float64"),
    (jax.random.split(jax.random.key(0), 2), "key array of shape"),
])
def test_a_malformed_key_is_refused_up_front(rng, what):
    def encoder(p, x, key):
        return tower(p, x, key)

    with pytest.raises(GradCacheError, match=f"rng must be one JAX key.*{what}"):
        cached_loss(encoder, (Q, D), info_nce, chunk_size=4, rng=rng)
    with pytest.raises(GradCacheError, match=f"rng must be one JAX key.*{what}"):
        cached_step(encoder, (Q, D), info_nce, chunk_size=4, params=tower_params(), rng=rng)


def test_a_gradient_of_the_cached_gradient_and_vmap_are_exact():
    params = tower_params(hidden=3, dim_out=2)

    def full(p):
        return info_nce(tower(p, Q), tower(p, D))

    def penalty(loss):   # the cached gradient is JAX code of params: differentiating it is exact
        return jit(jax.grad(lambda p: sum(jnp.sum(g ** 2) for g in jax.tree_util.tree_leaves(
            jax.grad(loss)(p)))))

    f = cached_loss(tower, (Q, D), info_nce, chunk_size=4)
    assert max_relative_error(penalty(f)(params), penalty(full)(params)) <= 1e-9
    stacked = jax.tree_util.tree_map(lambda a: jnp.stack([a, 0.5 * a]), params)
    assert max_relative_error(jit(jax.vmap(jax.grad(f)))(stacked),
                              jit(jax.vmap(jax.grad(full)))(stacked)) <= 1e-10


def test_the_unwrap_docstring_example_runs():
    import doctest

    import gradcache_jax._check_errors as module

    with jax.enable_x64(False):   # as a user runs it
        runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
        for test in doctest.DocTestFinder().find(module.unwrap_check_errors,
                                                 "unwrap_check_errors", globs={}):
            runner.run(test)
    results = runner.summarize(verbose=False)
    assert results.attempted > 0 and results.failed == 0
