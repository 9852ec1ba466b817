"""Unit tests of the core: nested structures, chunk plans, validation, options, dispatch."""

from __future__ import annotations

import subprocess
import sys
from collections import OrderedDict, namedtuple

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import gradcache
from gradcache import ChunkPlan, GradCacheError, flatten, run_cached_step, unflatten
from gradcache.testing import LinearEncoder, NumpyBackend, NumpyInfoNCE
from tests.core.harness import TanhEncoder

Pair = namedtuple("Pair", "left right")
is_array = lambda v: isinstance(v, np.ndarray)  # noqa: E731

leaves = st.builds(lambda n: np.arange(float(n)), st.integers(0, 3))
statics = st.one_of(st.none(), st.integers(), st.text(max_size=3))
trees = st.recursive(
    st.one_of(leaves, statics),
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.lists(children, max_size=3).map(tuple),
        st.dictionaries(st.text(max_size=2), children, max_size=3),
        st.tuples(children, children).map(lambda t: Pair(*t)),
    ),
    max_leaves=8,
)


def _same(a, b) -> bool:
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and np.array_equal(a, b)
    if isinstance(a, dict):
        return type(a) is type(b) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    return a == b


@given(trees)
def test_flatten_unflatten_round_trip(tree) -> None:
    tensor_leaves, spec = flatten(tree, is_array)
    assert spec.num_leaves == len(tensor_leaves)
    assert _same(unflatten(spec, tensor_leaves), tree)


def test_mapping_subclasses_are_rebuilt() -> None:
    tree = OrderedDict(a=np.zeros(2))
    leaves_, spec = flatten(tree, is_array)
    assert type(unflatten(spec, leaves_)) is OrderedDict


@given(st.integers(1, 100), st.integers(1, 40))
def test_chunk_plan_covers_the_batch_in_order(batch: int, chunk: int) -> None:
    plan = ChunkPlan.uniform(batch, chunk)
    assert plan.bounds[0][0] == 0 and plan.bounds[-1][1] == batch
    assert all(a[1] == b[0] for a, b in zip(plan.bounds, plan.bounds[1:]))
    assert plan.is_uniform and plan.num_full * min(chunk, batch) + plan.remainder == batch
    assert plan.num_chunks == -(-batch // chunk)


def _problem(seed: int = 0, sizes=(6, 9)):
    rng = np.random.default_rng(seed)
    encoder = TanhEncoder(rng.normal(size=(3, 2)), rng.normal(size=2))
    inputs = [rng.normal(size=(n, 3)) for n in sizes]
    return encoder, inputs


def test_split_fn_gives_the_same_gradients() -> None:
    encoder, inputs = _problem()
    _, plain = run_cached_step(NumpyBackend(), encoder, inputs, NumpyInfoNCE(), chunk_size=4)
    uneven = lambda x, size: [x[:1], x[1:5], x[5:]]  # noqa: E731 - deliberately non-uniform
    _, split = run_cached_step(NumpyBackend(), encoder, inputs, NumpyInfoNCE(), chunk_size=4,
                               split_fn=uneven)
    for name in ("W", "b"):
        np.testing.assert_allclose(split[id(encoder)][name], plain[id(encoder)][name], rtol=1e-12)


def test_get_rep_and_loss_kwargs_reach_their_targets() -> None:
    encoder, inputs = _problem()
    seen = {}

    class Loss(NumpyInfoNCE):
        def value_and_grad(self, *reps, margin):
            seen["margin"] = margin
            return super().value_and_grad(*reps)

    wrapped = lambda x: {"pooled": encoder(x)}  # noqa: E731
    wrapped.vjp = encoder.vjp
    run_cached_step(NumpyBackend(), wrapped, inputs, Loss(), chunk_size=4,
                    get_rep=lambda out: out["pooled"], loss_kwargs={"margin": 0.3})
    assert seen == {"margin": 0.3}


def test_check_finite_raises() -> None:
    encoder, inputs = _problem()
    inputs[0][0, 0] = np.nan
    with pytest.raises(GradCacheError, match="not finite"):
        run_cached_step(NumpyBackend(), encoder, inputs, NumpyInfoNCE(), chunk_size=4,
                        check_finite=True)


def test_check_determinism_catches_unreplayed_randomness() -> None:
    rng = np.random.default_rng(0)
    unreplayed = np.random.default_rng(1)  # not the backend's generator: the replay cannot see it
    encoder = LinearEncoder(rng.normal(size=(3, 2)), dropout=0.5, rng=unreplayed)
    inputs = [rng.normal(size=(6, 3)), rng.normal(size=(6, 3))]
    with pytest.raises(GradCacheError, match=r"group 0, chunk 0 \(pass 2\).*differs from pass 1"):
        run_cached_step(NumpyBackend(), encoder, inputs, NumpyInfoNCE(), chunk_size=4,
                        check_determinism=True)


def test_replayed_randomness_passes_the_determinism_check() -> None:
    rng = np.random.default_rng(0)
    stream = np.random.default_rng(1)
    encoder = LinearEncoder(rng.normal(size=(3, 2)), dropout=0.5, rng=stream)
    inputs = [rng.normal(size=(6, 3)), rng.normal(size=(6, 3))]
    run_cached_step(NumpyBackend(stream), encoder, inputs, NumpyInfoNCE(), chunk_size=4,
                    check_determinism=True)


def test_user_errors_keep_their_type_and_gain_a_location_note() -> None:
    encoder, inputs = _problem()

    def broken(x):
        raise KeyError("inside the model")

    broken.vjp = encoder.vjp
    with pytest.raises(KeyError) as info:
        run_cached_step(NumpyBackend(), broken, inputs, NumpyInfoNCE(), chunk_size=4)
    assert any("group 0, chunk 0 (pass 1)" in note for note in info.value.__notes__)


def test_progress_bar_counts_both_passes(monkeypatch) -> None:
    import tqdm.auto

    bars = []

    class Bar:
        def __init__(self, total, **kwargs):
            self.total, self.n, self.closed = total, 0, False
            bars.append(self)

        def set_description(self, text, refresh=True):
            pass

        def update(self, n):
            self.n += n

        def close(self):
            self.closed = True

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    encoder, inputs = _problem()
    run_cached_step(NumpyBackend(), encoder, inputs, NumpyInfoNCE(), chunk_size=4, progress=True)
    assert [(b.total, b.n, b.closed) for b in bars] == [(10, 10, True)]  # 2 + 3 chunks, twice


def test_non_callable_encoder() -> None:
    _, inputs = _problem()
    with pytest.raises(GradCacheError, match="encoder for group 1 is not callable"):
        run_cached_step(NumpyBackend(), [TanhEncoder(np.eye(3), np.zeros(3)), 3], inputs,
                        NumpyInfoNCE(), chunk_size=4)


def test_scalar_leaf_has_no_batch_dimension() -> None:
    with pytest.raises(GradCacheError, match="'scale' of shape \\(\\) has no batch dimension"):
        run_cached_step(NumpyBackend(), lambda **k: k["x"], ({"x": np.ones((2, 2)),
                                                               "scale": np.float64(1.0)},),
                        NumpyInfoNCE(), chunk_size=1)


@pytest.mark.parametrize("get_rep", [[False, None], [3, None]])
def test_get_rep_entries_must_be_callable(get_rep) -> None:
    # False once passed silently as "no get_rep", and 3 failed late with a bare TypeError
    encoder, inputs = _problem()
    with pytest.raises(GradCacheError, match="get_rep for group 0 must be callable"):
        run_cached_step(NumpyBackend(), encoder, inputs, NumpyInfoNCE(), chunk_size=4,
                        get_rep=get_rep)


def test_dispatch_refuses_unknown_tensors() -> None:
    with pytest.raises(GradCacheError, match="cannot tell which framework"):
        gradcache.cached_step(lambda x: x, (np.ones((2, 2)),), NumpyInfoNCE(), chunk_size=1)


def test_dispatch_on_numpy_with_params_imports_no_framework() -> None:
    # numpy batches with params= are JAX's idiom, but only if the user imported JAX
    code = ("import sys, numpy as np, gradcache\n"
            "try:\n"
            "    gradcache.cached_step(lambda p, x: x, (np.ones((2, 2)),), None, chunk_size=1,\n"
            "                          params={})\n"
            "except gradcache.GradCacheError as error:\n"
            "    print(error)\n"
            "bad = [m for m in ('torch', 'jax', 'tensorflow', 'keras', 'flax', 'mlx') if m in sys.modules]\n"
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "jax is not imported" in result.stdout and "gradcache_jax.cached_step" in result.stdout


def test_importing_the_core_loads_no_framework() -> None:
    code = ("import sys, gradcache, gradcache.testing; "
            "bad = [m for m in ('torch', 'jax', 'tensorflow', 'keras', 'flax', 'mlx') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_core_imports_neither_adapters_nor_tools() -> None:
    """The core is the algorithm alone: no module of it imports an adapter or ``gradcache_cli`` (the
    demo, bench and command line, reached as ``gradcache`` or ``python -m gradcache_cli``), and
    importing it loads none. Adapters are found at call time by name (``cached_step``'s
    dispatch), never imported by the core's modules."""
    import ast
    from pathlib import Path

    outside = ("gradcache_torch", "gradcache_jax", "gradcache_tf", "gradcache_mlx", "gradcache_cli")
    core = Path(gradcache.__file__).parent
    found = []
    for path in sorted(core.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{path.relative_to(core)}: {name}" for name in names
                      if name.split(".")[0] in outside]
    assert found == []
    assert not [p.name for p in core.iterdir() if p.name.startswith(("_demo", "_bench", "_cli"))]
    code = ("import sys, gradcache, gradcache.testing; "
            f"print([m for m in sys.modules if m.split('.')[0] in {outside!r}])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
