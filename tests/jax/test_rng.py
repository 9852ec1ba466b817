"""Keys: each chunk's key is ``chunk_key(rng, group, chunk)``, the same in both passes, the same in a
scanned loop (traced index) as in a Python loop (int index), and different from chunk to chunk."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradcache_jax import cached_step, chunk_key
from tests.jax.common import batch, info_nce, jit, max_relative_error, tower, tower_params


def _key_bits(key):
    return np.asarray(jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
                      else key).tolist()


def test_chunk_key_is_fold_in_of_group_then_chunk():
    rng = jax.random.key(3)
    expected = jax.random.fold_in(jax.random.fold_in(rng, 2), 5)
    assert _key_bits(chunk_key(rng, 2, 5)) == _key_bits(expected)
    traced = jit(chunk_key)(rng, 2, jnp.int32(5))
    assert _key_bits(traced) == _key_bits(expected)


@pytest.mark.parametrize("make_key", [jax.random.PRNGKey, jax.random.key], ids=["raw", "typed"])
def test_each_chunk_sees_its_key_in_both_passes(make_key):
    # under jit: the scanned chunks derive their keys from a traced index, the last one from an int
    rng = make_key(7)
    seen = []

    def record(bits, rows):
        seen.append((tuple(np.asarray(bits).ravel().tolist()), int(rows)))

    def encoder(p, x, key):
        bits = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
        # ordered: the host sees the evaluations in program order, pass 1 then pass 2
        jax.debug.callback(record, bits, x.shape[0], ordered=True)
        return tower(p, x, key)

    q, d = batch(10), batch(6, seed=2)  # chunks of 4: group 0 has 3 chunks, group 1 has 2
    def step(p, q, d, k):
        return cached_step(encoder, (q, d), _loss, chunk_size=4, params=p, rng=k)

    jax.block_until_ready(jit(step)(tower_params(), q, d, rng))

    def expected(group, chunk, rows):
        return (tuple(np.ravel(_key_bits(chunk_key(rng, group, chunk))).tolist()), rows)

    pass_1 = [expected(0, 0, 4), expected(0, 1, 4), expected(0, 2, 2),
              expected(1, 0, 4), expected(1, 1, 2)]
    assert seen == pass_1 + pass_1
    assert len({bits for bits, _ in pass_1}) == 5, "two chunks shared a key"


def test_scanned_and_python_loops_draw_the_same_masks():
    # eager with a progress bar runs the chunks in Python (int index); jit scans them (traced index)
    params, q, d, rng = tower_params(), batch(10), batch(10, seed=2), jax.random.PRNGKey(1)
    def step(p, q, d, k, **options):
        return cached_step(tower, (q, d), info_nce, chunk_size=3, params=p, rng=k, **options)

    scanned = jit(step)(params, q, d, rng)
    pytest.importorskip("tqdm")
    python = step(params, q, d, rng, progress=True)
    assert max_relative_error(scanned, python) <= 1e-12


def test_dropout_equals_chunk_by_chunk_reference_with_chunk_keys():
    params, q, d, rng = tower_params(), batch(11), batch(7, seed=2), jax.random.PRNGKey(2)

    def reference(p):
        reps = []
        for group, x in enumerate((q, d)):
            parts = [tower(p, x[s:s + 3], chunk_key(rng, group, i))
                     for i, s in enumerate(range(0, x.shape[0], 3))]
            reps.append(jnp.concatenate(parts))
        return _loss(*reps)

    _, grads = jit(lambda p, q, d, k: cached_step(tower, (q, d), _loss, chunk_size=3, params=p,
                                                      rng=k))(params, q, d, rng)
    assert max_relative_error(grads, jit(jax.grad(reference))(params)) <= 1e-10
    without = jit(jax.grad(lambda p: _loss(tower(p, q), tower(p, d))))(params)
    assert max_relative_error(grads, without) > 1e-3, "dropout drew no mask"


def _loss(q, d):
    """InfoNCE of the queries against all passages (there are fewer passages than queries)."""
    scores = q[: d.shape[0]] @ d.T
    return jnp.mean(jax.nn.logsumexp(scores, axis=1) - jnp.diagonal(scores))
