"""The step under ``jax.jit``: a program that does not grow with the chunks, and the checks, errors
and progress bar that must behave sensibly when the chunks run inside one compiled loop."""

from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import io_callback

from gradcache import GradCacheError
from gradcache_jax import cached_step
from tests.jax.common import batch, info_nce, jit, max_relative_error, tower, tower_params


def count_equations(jaxpr: jax.extend.core.Jaxpr) -> int:
    """Equations of a jaxpr, those of its sub-jaxprs (scan bodies, vjps) included."""
    total = 0
    for eqn in jaxpr.eqns:
        total += 1
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            total += count_equations(sub)
    return total


def primitives(jaxpr: jax.extend.core.Jaxpr) -> set:
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            names |= primitives(sub)
    return names


def _step(p, q, d, k):
    return cached_step(tower, (q, d), info_nce, chunk_size=4, params=p, rng=k)


def _args(rows: int) -> tuple:
    return (tower_params(), batch(rows), batch(rows, seed=2), jax.random.PRNGKey(0))


@pytest.mark.parametrize("remainder", [0, 3])
def test_program_size_does_not_grow_with_the_number_of_chunks(remainder):
    sizes = {}
    for chunks in (4, 64):
        args = _args(4 * chunks + remainder)
        jaxpr = jax.make_jaxpr(_step)(*args).jaxpr
        lowered = jax.jit(_step).lower(*args).as_text()
        sizes[chunks] = (count_equations(jaxpr), len(lowered.splitlines()))
    assert sizes[4] == sizes[64], sizes


def test_chunk_loops_are_scans():
    assert "scan" in primitives(jax.make_jaxpr(_step)(*_args(4 * 8 + 1)).jaxpr)


@pytest.mark.parametrize("rows", [17, 3])
def test_jitted_step_equals_full_batch_grad(rows):
    params, q, d, _ = _args(rows)
    loss, grads = jit(lambda p, q, d: cached_step(tower, (q, d), info_nce, chunk_size=4,
                                                      params=p))(params, q, d)
    ref_loss, ref_grads = jax.value_and_grad(lambda p: info_nce(tower(p, q), tower(p, d)))(params)
    assert abs(float(loss) - float(ref_loss)) <= 1e-10 * abs(float(ref_loss))
    assert max_relative_error(grads, ref_grads) <= 1e-10


def test_split_fn_chunks_run_in_python_and_stay_exact():
    params, q, d, _ = _args(10)

    def split(x, size):  # uneven chunks: 1, 2, 3, 4 rows
        return [x[0:1], x[1:3], x[3:6], x[6:10]]

    _, grads = jit(lambda p, q, d: cached_step(tower, (q, d), info_nce, chunk_size=4,
                                                   params=p, split_fn=split))(params, q, d)
    ref = jax.grad(lambda p: info_nce(tower(p, q), tower(p, d)))(params)
    assert max_relative_error(grads, ref) <= 1e-10


def test_error_in_the_last_shorter_chunk_names_that_chunk():
    params, q, d, _ = _args(10)  # chunks of 4: 0 and 1 scanned, chunk 2 has 2 rows

    def encoder(p, x):
        out = tower(p, x)
        return out[:1] if x.shape[0] == 2 else out

    with pytest.raises(GradCacheError, match=r"group 0, chunk 2 .*has 2 rows"):
        jit(lambda p, q, d: cached_step(encoder, (q, d), info_nce, chunk_size=4,
                                            params=p))(params, q, d)


# -- check_finite -----------------------------------------------------------------------------------
def _nan_loss(q, d):
    return info_nce(q, d) * jnp.nan


def test_check_finite_eagerly_raises_gradcache_error():
    params, q, d, _ = _args(8)
    with pytest.raises(GradCacheError, match="not finite"):
        cached_step(tower, (q, d), _nan_loss, chunk_size=4, params=params, check_finite=True)


def test_check_finite_under_jit_fails_the_compiled_call():
    params, q, d, _ = _args(8)
    step = jit(lambda p, q, d: cached_step(tower, (q, d), _nan_loss, chunk_size=4, params=p,
                                               check_finite=True))
    with pytest.raises(jax.errors.JaxRuntimeError, match="GradCacheError: the loss is not finite"):
        jax.block_until_ready(step(params, q, d))


# -- check_determinism ------------------------------------------------------------------------------
def _drifting_encoder():
    """An encoder with hidden state the replay cannot reproduce: a host counter it adds."""
    calls = {"n": 0}

    def next_value():
        calls["n"] += 1
        return np.asarray(calls["n"], np.float64)

    def encoder(p, x):
        drift = io_callback(next_value, jax.ShapeDtypeStruct((), jnp.float64), ordered=True)
        return tower(p, x) + 1e-3 * drift

    return encoder


def test_check_determinism_eagerly_names_the_chunk():
    params, q, d, _ = _args(8)
    with pytest.raises(GradCacheError, match=r"group 0, chunk 0 \(pass 2\).*differs from pass 1"):
        cached_step(_drifting_encoder(), (q, d), info_nce, chunk_size=4, params=params,
                    check_determinism=True)


def test_check_determinism_under_jit_fails_the_compiled_call():
    params, q, d, _ = _args(8)
    step = jit(lambda p, q, d: cached_step(_drifting_encoder(), (q, d), info_nce, chunk_size=4,
                                               params=p, check_determinism=True))
    with pytest.raises(jax.errors.JaxRuntimeError,
                       match=r"group 0, chunk 0 \(pass 2\).*differs from pass 1"):
        jax.block_until_ready(step(params, q, d))


def test_check_determinism_passes_a_deterministic_encoder_with_dropout_under_jit():
    params, q, d, key = _args(10)
    loss, grads = jit(lambda p, q, d, k: cached_step(
        tower, (q, d), info_nce, chunk_size=4, params=p, rng=k, check_determinism=True,
        determinism_tolerance=1e-12))(params, q, d, key)
    assert np.isfinite(float(loss))


# -- progress ---------------------------------------------------------------------------------------
class RecordingBar:
    """Stands in for tqdm: records what the core reports, whatever tqdm would redraw."""

    made: list = []

    def __init__(self, total: int, **_: object):
        self.total, self.count, self.descriptions = total, 0, []
        RecordingBar.made.append(self)

    def set_description(self, text: str, refresh: bool = True) -> None:
        self.descriptions.append(text)

    def update(self, n: int) -> None:
        self.count += n

    def close(self) -> None:
        pass


@pytest.fixture
def recording_bar(monkeypatch):
    tqdm_auto = pytest.importorskip("tqdm.auto")
    RecordingBar.made = []
    monkeypatch.setattr(tqdm_auto, "tqdm", RecordingBar)
    return RecordingBar


def test_progress_eagerly_follows_every_chunk(recording_bar):
    params, q, d, _ = _args(10)
    cached_step(tower, (q, d), info_nce, chunk_size=3, params=params, progress=True)
    (bar,) = recording_bar.made
    assert bar.total == bar.count == 16  # 4 chunks x 2 groups x 2 passes
    assert bar.descriptions[-1] == "gradcache pass 2, group 1"


def test_progress_under_jit_is_off_and_changes_nothing(recording_bar):
    params, q, d, _ = _args(10)
    plain = jit(lambda p, q, d: cached_step(tower, (q, d), info_nce, chunk_size=4,
                                                params=p))(params, q, d)
    with_bar = jit(lambda p, q, d: cached_step(tower, (q, d), info_nce, chunk_size=4,
                                                   params=p, progress=True))(params, q, d)
    assert recording_bar.made == []
    assert max_relative_error(with_bar, plain) == 0.0
