"""``gradcache_jax.cached_loss``: the cached loss as ``f(params)`` whose JAX derivative is the cached
gradient, composed the ways users differentiate and train (the contract suite runs its
``cached_loss`` mode in test_contract.py).

Every reference is the full-batch ``jax.grad`` (or, with dropout, ``cached_step`` with the same key);
float64 is on in this folder, so the tolerance is 1e-10. Programs are small and compiled once each.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradcache import GradCacheError
from gradcache_jax import cached_loss, cached_step
from tests.jax.common import batch, info_nce, jit, max_relative_error, tower, tower_params

TOLERANCE = 1e-10
with jax.enable_x64(True):   # this folder's float64 is switched on per test; the batch is made now
    Q, D = batch(10), batch(10, seed=2)


def full_loss(params):
    return info_nce(tower(params, Q), tower(params, D))


def l2(params):
    return 0.5 * jnp.sum(params["b1"] ** 2)


def scaled(tree, factor):
    return jax.tree_util.tree_map(lambda leaf: factor * leaf, tree)


@pytest.fixture(scope="module")
def reference():
    with jax.enable_x64(True):
        params = tower_params()
        loss, grads = jit(jax.value_and_grad(full_loss))(params)
        return params, loss, grads, jit(jax.grad(l2))(params)


def test_grad_and_value_and_grad_eagerly(reference):
    params, loss, grads, _ = reference
    f = cached_loss(tower, (Q, D), info_nce, chunk_size=4)
    value, got = jax.value_and_grad(f)(params)
    assert abs(float(value) - float(loss)) <= TOLERANCE * abs(float(loss))
    assert max_relative_error(got, grads) <= TOLERANCE


def test_jit_of_grad_and_grad_of_jit(reference):
    params, _, grads, _ = reference
    f = cached_loss(tower, (Q, D), info_nce, chunk_size=4)
    assert max_relative_error(jit(jax.grad(f))(params), grads) <= TOLERANCE
    assert max_relative_error(jax.grad(jax.jit(f))(params), grads) <= TOLERANCE


def test_a_scaled_loss_plus_another_term_in_a_jitted_step_with_the_batch_as_argument(reference):
    params, loss, grads, l2_grads = reference

    @jit
    def step(params, q, d):
        f = cached_loss(tower, (q, d), info_nce, chunk_size=3)   # q, d are tracers here
        return jax.value_and_grad(lambda p: 3.0 * f(p) + l2(p))(params)

    value, got = step(params, Q, D)
    want = jax.tree_util.tree_map(lambda g, e: 3.0 * g + e, grads, l2_grads)
    assert abs(float(value) - float(3.0 * loss + l2(params))) <= TOLERANCE * float(3.0 * loss)
    assert max_relative_error(got, want) <= TOLERANCE


def test_vjp_applied_twice_with_different_cotangents(reference):
    params, loss, grads, _ = reference
    value, pull = jax.vjp(cached_loss(tower, (Q, D), info_nce, chunk_size=4), params)
    assert abs(float(value) - float(loss)) <= TOLERANCE * abs(float(loss))
    (twice,) = pull(jnp.asarray(2.0))
    (once,) = pull(jnp.asarray(1.0))
    assert max_relative_error(twice, scaled(grads, 2.0)) <= TOLERANCE
    assert max_relative_error(once, grads) <= TOLERANCE


def _counting_tower(counts):
    def encoder(params, x):
        jax.debug.callback(lambda _: counts.__setitem__("n", counts["n"] + 1), x[0, 0])
        return tower(params, x)
    return encoder


def test_undifferentiated_it_is_the_loss_alone(reference):
    params, loss, _, _ = reference
    counts = {"n": 0}
    f = cached_loss(_counting_tower(counts), (Q, D), info_nce, chunk_size=4)
    value = jax.block_until_ready(jit(f)(params))
    assert abs(float(value) - float(loss)) <= TOLERANCE * abs(float(loss))
    assert counts["n"] == 6          # 3 chunks per group, encoded once: no pass 2
    counts["n"] = 0
    jax.block_until_ready(jit(jax.grad(f))(params))
    assert counts["n"] == 12         # pass 1 and pass 2


def test_a_loss_that_does_not_reach_the_output_gets_no_gradient(reference):
    params, _, _, l2_grads = reference
    f = cached_loss(tower, (Q, D), info_nce, chunk_size=4)
    got = jax.grad(lambda p: l2(p) + jax.lax.stop_gradient(f(p)))(params)
    assert max_relative_error(got, l2_grads) <= TOLERANCE


def test_dropout_replays_the_keys_of_cached_step():
    params, rng = tower_params(), jax.random.PRNGKey(7)

    @jit
    def both(params, rng):
        f = cached_loss(tower, (Q, D), info_nce, chunk_size=4, rng=rng)
        _, want = cached_step(tower, (Q, D), info_nce, chunk_size=4, params=params, rng=rng)
        return jax.grad(f)(params), want, jax.grad(full_loss)(params)

    got, want, plain = both(params, rng)
    assert max_relative_error(got, want) <= TOLERANCE
    assert max_relative_error(want, plain) > 1e-3   # the masks were drawn


def test_loss_owned_parameters_are_scaled_by_the_cotangent_too():
    params = dict(tower_params(), log_t=jnp.asarray(0.3, jnp.float64))

    def loss_fn(p, q, d):
        return jnp.exp(p["log_t"]) * info_nce(q, d)

    want = jit(jax.grad(lambda p: -1.5 * loss_fn(p, tower(p, Q), tower(p, D))))(params)
    f = cached_loss(tower, (Q, D), loss_fn, chunk_size=4, loss_takes_params=True)
    assert max_relative_error(jit(jax.grad(lambda p: -1.5 * f(p)))(params), want) <= TOLERANCE
    assert abs(float(f(params)) - float(loss_fn(params, tower(params, Q), tower(params, D)))) <= 1e-12


def test_get_rep_with_the_chunk_inputs_pools_over_a_mask():
    params = tower_params()
    rng = np.random.default_rng(3)
    tokens = {"x": jnp.asarray(rng.normal(size=(6, 5, 6))),
              "mask": jnp.asarray((rng.random((6, 5)) < 0.7).astype(np.float64))}
    tokens["mask"] = tokens["mask"].at[:, 0].set(1.0)

    def encode(p, batch):
        return tower(p, batch["x"])                        # (rows, tokens, dim)

    def mean_pool(out, batch):
        m = batch["mask"][..., None]
        return jnp.sum(out * m, axis=1) / jnp.sum(m, axis=1)

    want = jit(jax.grad(lambda p: info_nce(mean_pool(encode(p, tokens), tokens),
                                       mean_pool(encode(p, tokens), tokens)[::-1])))(params)
    f = cached_loss(encode, (tokens,), lambda r: info_nce(r, r[::-1]), chunk_size=4,
                    get_rep=mean_pool)
    assert max_relative_error(jit(jax.grad(f))(params), want) <= TOLERANCE


def test_a_gradient_of_the_inputs_is_refused():
    params = tower_params()
    with pytest.raises(GradCacheError, match="differentiates the parameters only"):
        jax.grad(lambda q: cached_loss(tower, (q, D), info_nce, chunk_size=4)(params))(Q)


def test_a_collective_of_ones_own_is_for_cached_step():
    from gradcache import Collective

    class Mine(Collective):
        world_size, rank = 1, 0

    with pytest.raises(GradCacheError, match="is for cached_step"):
        cached_loss(tower, (Q, D), info_nce, chunk_size=4, distributed=Mine())


def test_a_failure_inside_the_backward_raises():
    """Pass 2 alone fails (the encoder is not deterministic): the gradient call raises; being
    functional, there is nothing to roll back -- no gradient comes out."""
    params = tower_params()
    calls = {"n": 0}

    def flaky(p, x):   # eagerly, each chunk's Python runs: the second pass sees other values
        calls["n"] += 1
        return tower(p, x) * (1.0 + 1e-3 * calls["n"])

    f = cached_loss(flaky, (Q, D), info_nce, chunk_size=5, check_determinism=True)
    value = f(params)                # the forward alone never checks
    assert np.isfinite(float(value))
    with pytest.raises(GradCacheError, match="pass 2"):
        jax.grad(f)(params)


def test_a_runtime_failure_in_pass_two_fails_the_compiled_gradient():
    params = tower_params()
    evaluations = {"n": 0}

    def tick(_):
        evaluations["n"] += 1
        if evaluations["n"] > 6:        # 6 chunks in pass 1: fail in pass 2
            raise RuntimeError("injected failure")

    def failing(p, x):
        jax.debug.callback(tick, x[0, 0])
        return tower(p, x)

    f = cached_loss(failing, (Q, D), info_nce, chunk_size=4)
    with pytest.raises(Exception, match="injected failure"):
        jax.block_until_ready(jit(jax.grad(f))(params))


# -- the frameworks people train with -------------------------------------------------------------------
optax = pytest.importorskip("optax")


def test_optax_training_with_cached_loss_matches_cached_step():
    tx = optax.adamw(1e-2)

    @jit
    def loss_step(params, opt_state, q, d):
        f = cached_loss(tower, (q, d), info_nce, chunk_size=5)
        loss, grads = jax.value_and_grad(f)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    @jit
    def step_step(params, opt_state, q, d):
        loss, grads = cached_step(tower, (q, d), info_nce, chunk_size=5, params=params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    a = b = tower_params()
    a_state = b_state = tx.init(a)
    for _ in range(3):
        a, a_state, a_loss = loss_step(a, a_state, Q, D)
        b, b_state, b_loss = step_step(b, b_state, Q, D)
        assert abs(float(a_loss) - float(b_loss)) <= TOLERANCE * abs(float(b_loss))
    assert max_relative_error(a, b) <= TOLERANCE


def test_flax_nnx_value_and_grad_with_dropout():
    nnx = pytest.importorskip("flax.nnx")

    class Tower(nnx.Module):
        def __init__(self, rngs):
            self.dense = nnx.Linear(6, 8, param_dtype=jnp.float64, rngs=rngs)
            self.drop = nnx.Dropout(0.25, rngs=rngs)
            self.out = nnx.Linear(8, 4, param_dtype=jnp.float64, rngs=rngs)

        def __call__(self, x):
            return self.out(self.drop(jnp.tanh(self.dense(x))))

    model = Tower(nnx.Rngs(0, dropout=1))
    rng = jax.random.PRNGKey(3)

    def loss_of_model(model, q, d):
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def encoder(params, x, key):
            module = nnx.merge(graphdef, params, rest, copy=True)
            nnx.reseed(module, dropout=key)
            return module(x)

        return cached_loss(encoder, (q, d), info_nce, chunk_size=4, rng=rng)(params), \
            (encoder, params)

    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer))

    @jit   # nnx's functional API around a plain jax.jit (LLVM optimisations off, as everywhere here)
    def train_step(state, q, d):
        model, optimizer = nnx.merge(graphdef, state)
        (loss, (encoder, params)), grads = nnx.value_and_grad(loss_of_model, has_aux=True)(
            model, q, d)
        _, want = cached_step(encoder, (q, d), info_nce, chunk_size=4, params=params, rng=rng)
        optimizer.update(model, grads)
        return loss, nnx.state(grads, nnx.Param), want, nnx.state((model, optimizer))

    before = jnp.array(model.dense.kernel[...])
    loss, grads, want, state = train_step(state, Q, D)
    nnx.update((model, optimizer), state)
    assert np.isfinite(float(loss))
    assert max_relative_error(grads, want) <= TOLERANCE
    assert not jnp.allclose(model.dense.kernel[...], before)


def test_equinox_filter_value_and_grad_and_optax():
    eqx = pytest.importorskip("equinox")
    model = eqx.nn.MLP(6, 4, 8, 2, activation=jnp.tanh, dtype=jnp.float64,
                       key=jax.random.PRNGKey(0))

    def encoder(model, x):
        return jax.vmap(model)(x)

    arrays, static = eqx.partition(model, eqx.is_array)

    @jit
    def value_and_grads(arrays, q, d):
        model = eqx.combine(arrays, static)
        f = cached_loss(encoder, (q, d), info_nce, chunk_size=4)
        got = eqx.filter_value_and_grad(lambda m: f(m))(model)
        want = eqx.filter_value_and_grad(lambda m: info_nce(encoder(m, q), encoder(m, d)))(model)
        return got, want

    (loss, grads), (want_loss, want) = value_and_grads(arrays, Q, D)
    assert abs(float(loss) - float(want_loss)) <= TOLERANCE * abs(float(want_loss))
    assert max_relative_error(eqx.filter(grads, eqx.is_array), eqx.filter(want, eqx.is_array)) <= TOLERANCE

    tx = optax.sgd(0.1)
    updates, _ = tx.update(grads, tx.init(eqx.filter(model, eqx.is_array)))
    trained = eqx.apply_updates(model, updates)
    assert not jnp.allclose(trained.layers[0].weight, model.layers[0].weight)


def test_the_docstring_example_runs():
    import doctest

    import gradcache_jax._loss as module

    with jax.enable_x64(False):   # as a user runs it
        finder = doctest.DocTestFinder()
        runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
        for test in finder.find(module.cached_loss, "cached_loss", globs={}):
            runner.run(test)
    results = runner.summarize(verbose=False)
    assert results.attempted > 0 and results.failed == 0
