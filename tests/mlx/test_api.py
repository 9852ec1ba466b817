"""``gradcache_mlx`` beyond the contract suite: MLX's conventions (gradients shaped like
``model.trainable_parameters()``, ``optimizer.update``), dropout replay checked by Euler's theorem,
inputs as MLX modules take them, dispatch, memory, and what MLX cannot do (``mx.compile`` of the
whole step)."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

from gradcache import GradCacheError

mx = pytest.importorskip("mlx.core")
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
from mlx.utils import tree_flatten, tree_map  # noqa: E402

import gradcache  # noqa: E402
import gradcache_mlx  # noqa: E402
from gradcache_mlx import cached_loss, cached_step  # noqa: E402


def info_nce(q, d):
    scores = q @ d.T
    return mx.mean(mx.logsumexp(scores, axis=1) - mx.diagonal(scores))


def batch(rows: int = 10, dim: int = 6, seed: int = 0, dtype=mx.float64) -> tuple:
    rng = np.random.default_rng(seed)
    return tuple(mx.array(rng.normal(size=(rows, dim)), dtype=dtype) for _ in range(2))


def assert_trees_close(actual, expected, tolerance: float = 1e-10) -> None:
    """Every gradient within ``tolerance`` of the largest one (a bias whose gradient cancels to
    ~0 keeps the rounding of its terms)."""
    assert tree_map(lambda _: 0, actual) == tree_map(lambda _: 0, expected)   # same structure
    scale = max(float(mx.max(mx.abs(e)).item()) for _, e in tree_flatten(expected))
    for (path, a), (_, e) in zip(tree_flatten(actual), tree_flatten(expected)):
        assert float(mx.max(mx.abs(a - e)).item()) <= tolerance * scale, path


class Linear(nn.Module):
    """``dropout(x) @ W``: linear in its weights, whatever the mask."""

    def __init__(self, dim_in: int, dim_out: int, dropout: float):
        super().__init__()
        self.W = mx.array(np.random.default_rng(1).normal(size=(dim_in, dim_out)),
                          dtype=mx.float64)
        self.dropout = nn.Dropout(dropout)

    def __call__(self, x):
        return self.dropout(x) @ self.W


def test_dropout_replay_by_euler():
    """An encoder linear in its weights and a loss linear in the representations make the loss
    homogeneous of degree 1 in the weights: ``loss == <grad, W>`` (Euler), but only if pass 2
    drew the masks pass 1 drew -- the loss is pass 1's, the gradient pass 2's."""
    encoder = Linear(6, 4, dropout=0.5)
    weights = [mx.array(np.random.default_rng(2).normal(size=(10, 4)), dtype=mx.float64)
               for _ in range(2)]

    def linear_loss(q, d):
        return mx.sum(q * weights[0]) + mx.sum(d * weights[1])

    def euler_gap() -> float:
        mx.random.seed(7)
        loss, grads = cached_step(encoder, batch(), linear_loss, chunk_size=3)
        return abs(loss.item() - mx.sum(grads["W"] * encoder.W).item()) / abs(loss.item())

    assert euler_gap() <= 1e-12
    # the check has teeth: pass 2 drawing fresh masks breaks it
    replay = gradcache_mlx.MLXBackend.rng_replay
    gradcache_mlx.MLXBackend.rng_replay = lambda self, record: contextlib.nullcontext()
    try:
        assert euler_gap() > 1e-3
    finally:
        gradcache_mlx.MLXBackend.rng_replay = replay


class Tower(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 4))
        self.body.layers[0].freeze(keys=["bias"])
        self.set_dtype(mx.float64)

    def __call__(self, input_ids=None, features=None, extra=None):
        x = features if extra is None else features + extra[0]
        return {"pooled": mx.tanh(self.body(x)), "length": mx.sum(input_ids, axis=1)}


def test_gradients_are_shaped_like_trainable_parameters_and_update_as_value_and_grad():
    """Dict inputs (keyword arguments), a nested list inside them, a dict output with an integer
    leaf, a frozen bias and a parameterless layer; gradients equal ``nn.value_and_grad``'s on a
    chunk-by-chunk forward with the same random state, and the optimizer applies them alike."""
    q, d = batch(9)
    ids = mx.array(np.arange(18).reshape(9, 2))
    groups = ({"input_ids": ids, "features": q}, {"input_ids": ids, "features": d, "extra": [q]})
    def loss_fn(q, d):   # the integer leaf "length" is handed over, and has no gradient
        return info_nce(q["pooled"], d["pooled"]) + 0 * mx.sum(q["length"])

    models = [Tower(), Tower()]
    models[1].update(models[0].parameters())
    held = [id(a) for _, a in tree_flatten(models[0].parameters())]
    mx.random.seed(3)
    loss, grads = cached_step(models[0], groups, loss_fn, chunk_size=4)
    assert [id(a) for _, a in tree_flatten(models[0].parameters())] == held   # the caller's arrays

    def rows(group, s):
        return {k: v[s:s + 4] if isinstance(v, mx.array) else [v[0][s:s + 4]]
                for k, v in group.items()}

    def chunked():
        reps = [[models[1](**rows(group, s)) for s in range(0, 9, 4)] for group in groups]
        return loss_fn(*[{k: mx.concatenate([r[k] for r in parts]) for k in parts[0]}
                         for parts in reps])

    mx.random.seed(3)
    expected, expected_grads = nn.value_and_grad(models[1], chunked)()
    assert abs(loss.item() - expected.item()) <= 1e-12
    assert_trees_close(grads, expected_grads)
    assert "bias" not in grads["body"]["layers"][0] and grads["body"]["layers"][1] == {}
    for model, g in zip(models, (grads, expected_grads)):
        optim.SGD(learning_rate=0.1).update(model, g)
    assert_trees_close(models[0].parameters(), models[1].parameters())


def test_a_model_holding_the_towers_and_the_temperature():
    class DualEncoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.query, self.passage = nn.Linear(6, 4), nn.Linear(6, 4)
            self.log_scale = mx.array(1.0)
            self.set_dtype(mx.float64)

        def loss(self, q, d):
            return info_nce(mx.exp(self.log_scale) * q, d)

    model = DualEncoder()
    q, d = batch()
    loss, grads = cached_step([model.query, model.passage], (q, d), model.loss, chunk_size=3,
                              model=model)
    expected, expected_grads = nn.value_and_grad(
        model, lambda: model.loss(model.query(q), model.passage(d)))()
    assert_trees_close(grads, expected_grads)
    # cached_loss inside the caller's own objective, with another term
    def objective():
        contrastive = cached_loss([model.query, model.passage], (q, d), model.loss, chunk_size=4,
                                  model=model)
        return 0.5 * contrastive + mx.sum(model.query.weight ** 2)

    def reference():
        return 0.5 * model.loss(model.query(q), model.passage(d)) + mx.sum(model.query.weight ** 2)

    assert_trees_close(nn.value_and_grad(model, objective)()[1],
                       nn.value_and_grad(model, reference)()[1])


def test_which_module_is_differentiated_is_said():
    q, d = batch()
    towers = [nn.Linear(6, 4), nn.Linear(6, 4)]
    with pytest.raises(GradCacheError, match="pass model="):
        cached_step(towers, (q, d), info_nce, chunk_size=3)
    with pytest.raises(GradCacheError, match="pass model="):
        cached_step(lambda x: towers[0](x), (q, d), info_nce, chunk_size=3)
    with pytest.raises(GradCacheError, match="model= must be an mlx.nn.Module"):
        cached_step(towers, (q, d), info_nce, chunk_size=3, model=towers)
    with pytest.raises(GradCacheError, match="distributed= is not supported"):
        cached_step(towers[0], (q, d), info_nce, chunk_size=3, distributed=True)
    with pytest.raises(GradCacheError, match=r"did you mean 'check_finite'.*gradcache_mlx"):
        cached_loss(towers[0], (q, d), info_nce, chunk_size=3, chek_finite=True)


def test_a_frozen_model_has_nothing_to_pull_back():
    tower = nn.Linear(6, 4)
    tower.freeze()
    calls = []
    loss, grads = cached_step(lambda x: calls.append(1) or tower(x), batch(dtype=mx.float32),
                              info_nce, chunk_size=5, model=tower)
    assert grads == {} and len(calls) == 4   # pass 1 only


def test_dispatch_on_mlx_arrays():
    tower = nn.Linear(6, 4)
    tower.set_dtype(mx.float64)
    q, d = batch()
    loss, grads = gradcache.cached_step(tower, (q, d), info_nce, chunk_size=4)
    assert_trees_close(grads, nn.value_and_grad(tower, lambda: info_nce(tower(q), tower(d)))()[1])


def test_check_finite_and_determinism():
    tower = nn.Linear(6, 4)
    q, d = batch(dtype=mx.float32)
    with pytest.raises(GradCacheError, match="not finite"):
        cached_step(tower, (q, d), lambda q, d: info_nce(q, d) / 0.0, chunk_size=4,
                    check_finite=True)
    calls = []   # an encoder that changes between the passes (random draws are replayed)
    drifting = lambda x: tower(x) + 1e-3 * len(calls.append(1) or calls)  # noqa: E731
    with pytest.raises(GradCacheError, match="differ"):
        cached_step(drifting, (q, d), info_nce, chunk_size=4, model=tower,
                    check_determinism=True)


def test_memory_of_a_chunk_not_of_the_batch():
    """Each chunk is evaluated before the next: peak memory is one chunk's activations, in
    ``cached_step`` and in ``cached_loss`` under ``nn.value_and_grad`` (where MLX keeps every
    evaluated array's graph unless the values are copied out of it)."""
    tower = nn.Sequential(nn.Linear(16, 1024), nn.GELU(), nn.Linear(1024, 8))
    q, d = mx.random.normal((256, 16)), mx.random.normal((256, 16))
    mx.eval(tower.parameters(), q, d)

    def peak(fn) -> float:
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        mx.eval(fn())
        return mx.get_peak_memory() - base

    full = peak(lambda: nn.value_and_grad(tower, lambda: info_nce(tower(q), tower(d)))())
    step = peak(lambda: cached_step(tower, (q, d), info_nce, chunk_size=32))
    loss = peak(lambda: nn.value_and_grad(tower, lambda: cached_loss(
        tower, (q, d), info_nce, chunk_size=32))())
    assert full > 2 * 256 * 1024 * 4            # two groups' hidden activations, float32
    assert step < full / 4 and loss < full / 4, (step, loss, full)


def test_a_compiled_encoder_works_and_a_compiled_step_is_refused():
    model = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.3), nn.Linear(8, 4))
    q, d = batch(dtype=mx.float32)
    state = [model.state, mx.random.state]
    compiled = mx.compile(model, inputs=state, outputs=state)
    mx.random.seed(5)
    _, grads = cached_step(compiled, (q, d), info_nce, chunk_size=3, model=model)
    mx.random.seed(5)
    _, plain = cached_step(model, (q, d), info_nce, chunk_size=3)
    assert_trees_close(grads, plain, 1e-6)

    fresh = nn.Linear(6, 4)
    with pytest.raises(GradCacheError, match="compile the encoder instead"):
        mx.compile(lambda q, d: cached_step(fresh, (q, d), info_nce, chunk_size=3)[0])(q, d)


def test_module_examples():
    import doctest

    import gradcache_mlx._step
    result = doctest.testmod(gradcache_mlx._step, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0, result


def test_half_precision_gradients_are_summed_in_float32():
    """bf16 parameters: each chunk's gradient is added in float32 and the sum cast back once, so
    that many small chunks do not lose their contributions to bf16 rounding."""
    mx.random.seed(0)
    model = nn.Linear(8, 4)
    model.set_dtype(mx.bfloat16)
    q, d = (mx.random.normal((128, 8)).astype(mx.bfloat16) for _ in range(2))
    loss_fn = lambda q, d: info_nce(q.astype(mx.float32), d.astype(mx.float32))  # noqa: E731
    _, grads = cached_step(model, (q, d), loss_fn, chunk_size=2)
    reference = model.trainable_parameters()   # the same step in float32, from the same weights
    wide = nn.Linear(8, 4)
    wide.update(tree_map(lambda p: p.astype(mx.float32), reference))
    _, expected = cached_step(wide, (q.astype(mx.float32), d.astype(mx.float32)), loss_fn,
                              chunk_size=128)
    assert grads["weight"].dtype == mx.bfloat16
    error = mx.max(mx.abs(grads["weight"].astype(mx.float32) - expected["weight"])).item()
    # one bf16 rounding of the sum is 2^-8 relative (0.0026 seen); the sum of 64 chunks taken in
    # bf16 was 0.013-0.02 off
    assert error <= 0.006 * mx.max(mx.abs(expected["weight"])).item()


def test_the_backend_defaults_read_mlx_arrays() -> None:
    """``shape`` and ``differentiable`` are the core's defaults on MLX: they must agree with MLX's
    own notions, for every dtype MLX has."""
    from types import SimpleNamespace

    backend = gradcache.Backend()
    dtypes = {value for value in vars(mx).values() if isinstance(value, mx.Dtype)}
    assert len(dtypes) > 10
    for dtype in dtypes:
        assert backend.differentiable(SimpleNamespace(dtype=dtype)) == bool(
            mx.issubdtype(dtype, mx.inexact)), dtype
    assert backend.shape(mx.zeros((4, 3))) == (4, 3) and backend.shape(mx.array(1.0)) == ()
