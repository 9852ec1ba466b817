"""The public loss functions written once (``gradcache._loss_api``) and bound to each backend.

A binding over numpy (values only, no gradients) checks the machinery without any framework; then
each installed adapter's seven functions are checked to be its own: module, names, signature,
a docstring with its pieces filled in and nothing left over.
"""

from __future__ import annotations

import doctest
import importlib
import inspect
import subprocess
import sys

import numpy as np
import pytest

from gradcache import GradCacheError, _loss_api, _tile_ops, _tiled
from gradcache._loss_api import AcrossRanks, LossDocs, bind

NAMES = ("info_nce", "clip_loss", "siglip_loss", "info_nce_dense", "clip_loss_dense",
         "siglip_loss_dense", "across_ranks")
KEYWORDS = {
    "info_nce": ["temperature", "similarity", "tile_size"],
    "clip_loss": ["logit_scale", "similarity", "tile_size"],
    "siglip_loss": ["logit_scale", "logit_bias", "similarity", "tile_size"],
    "info_nce_dense": ["temperature", "similarity"],
    "clip_loss_dense": ["logit_scale", "similarity"],
    "siglip_loss_dense": ["logit_scale", "logit_bias", "similarity"],
}


class _NumpyLossOps:
    """:class:`gradcache._loss_forms.LossOps` over numpy, values only."""

    def tiled_sum(self, kind, x, y, alpha, beta, tile):
        return _tiled.tiled_forward(_tiled.NumpyOps(), kind, x, y, alpha, beta, tile)[0]

    def shape(self, x):
        return np.shape(x)

    def prepare(self, x):
        return np.asarray(x, np.float64)

    def as_scalar(self, value, like):
        return np.float64(value)

    def normalize(self, x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    def on_accelerator(self, x):
        return False

    def matmul_nt(self, a, b):
        return a @ b.T

    def transpose(self, x):
        return x.T

    def cross_entropy(self, logits, step):
        top = logits.max(axis=1, keepdims=True)
        lse = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0]
        return np.mean(lse - logits[np.arange(len(logits)), np.arange(len(logits)) * step])

    def sigmoid_loss(self, logits):
        labels = 2 * np.eye(len(logits)) - 1
        return np.logaddexp(0.0, -labels * logits).sum()


class _Across(AcrossRanks):
    place = "axis_name"


def _docs(**changes) -> LossDocs:
    pieces = dict(module="numpy_losses", array_type=np.ndarray, tensor="array",
                  learnable="a number you change", log_scale="``np.exp(log_scale)``",
                  autodiff="hand-written gradients", gradients="No gradients: values only.",
                  examples={name: f">>> {name!r}\n'{name}'" for name in NAMES[:-1]},
                  unit="rank", ranks="the numpy ranks", communicates="moves nothing",
                  specifics="A test binding.", place_doc="axis_name: which ranks.")
    pieces.update(changes)
    return LossDocs(**pieces)


@pytest.fixture(scope="module")
def numpy_losses():
    return bind(_NumpyLossOps(), _docs(), _Across)


def test_bound_functions_are_named_and_placed_as_the_backend_s(numpy_losses):
    for name, function in zip(NAMES, numpy_losses):
        assert function.__name__ == function.__qualname__ == name
        assert function.__module__ == "numpy_losses"
        assert "{" not in function.__doc__, function.__doc__  # every piece filled in
    assert numpy_losses._fields == NAMES


def test_signatures_show_the_keyword_arguments_and_defaults(numpy_losses):
    for name, keywords in KEYWORDS.items():
        parameters = inspect.signature(getattr(numpy_losses, name)).parameters
        assert list(parameters)[2:] == keywords
        assert all(parameters[k].kind is inspect.Parameter.KEYWORD_ONLY for k in keywords)
        assert parameters["similarity"].default == "dot"
        assert inspect.signature(getattr(numpy_losses, name)).return_annotation is np.ndarray
    assert inspect.signature(numpy_losses.siglip_loss).parameters["logit_bias"].default == -10.0
    across = inspect.signature(numpy_losses.across_ranks).parameters
    assert list(across) == ["loss", "axis_name", "loss_kwargs"]
    assert across["axis_name"].default is inspect.Parameter.empty


def test_bound_functions_behave_as_written(numpy_losses):
    rng = np.random.default_rng(0)
    q, p = rng.normal(size=(5, 3)), rng.normal(size=(10, 3))
    for similarity in ("dot", "cosine"):
        tiled = numpy_losses.info_nce(q, p, temperature=0.5, similarity=similarity, tile_size=2)
        dense = numpy_losses.info_nce_dense(q, p, temperature=0.5, similarity=similarity)
        assert abs(tiled - dense) <= 1e-12 * abs(dense)
    x, y = q, p[:5]
    assert np.isclose(numpy_losses.clip_loss(x, y, tile_size=3), numpy_losses.clip_loss_dense(x, y))
    assert np.isclose(numpy_losses.siglip_loss(x, y, logit_bias=-1.0, tile_size=4),
                      numpy_losses.siglip_loss_dense(x, y, logit_bias=-1.0))
    with pytest.raises(TypeError, match="positional"):
        numpy_losses.info_nce(q, p, 0.5)
    with pytest.raises(GradCacheError, match="similarity must be one of"):
        numpy_losses.clip_loss_dense(x, y, similarity="l2")


def test_across_ranks_takes_its_argument_by_name(numpy_losses):
    with pytest.raises(TypeError, match="missing 1 required keyword-only argument: 'axis_name'"):
        numpy_losses.across_ranks(numpy_losses.info_nce)
    with pytest.raises(GradCacheError, match="takes info_nce, clip_loss or siglip_loss from "
                                             "numpy_losses"):
        numpy_losses.across_ranks(numpy_losses.info_nce_dense, axis_name="r")
    with pytest.raises(GradCacheError, match="logit_bias"):
        numpy_losses.across_ranks(numpy_losses.clip_loss, axis_name="r", logit_bias=1.0)
    fn = numpy_losses.across_ranks(numpy_losses.clip_loss, axis_name="r", logit_scale=2.0)
    assert fn.gathers_itself and fn.axis_name == "r"
    assert repr(fn) == "across_ranks(clip_loss, axis_name='r', **{'logit_scale': 2.0})"
    with pytest.raises(NotImplementedError, match="which collective"):
        fn(np.ones((2, 2)), np.ones((2, 2)))


def test_docstrings_take_the_backend_s_pieces(numpy_losses):
    learnt = "a float or a scalar array (a number you change to learn it)"
    assert learnt in numpy_losses.info_nce.__doc__
    assert "No gradients: values only." in numpy_losses.clip_loss.__doc__
    assert "plain hand-written gradients, the reference" in " ".join(
        numpy_losses.clip_loss_dense.__doc__.split())
    across = numpy_losses.across_ranks.__doc__
    assert "each rank computing its own rows' share" in across
    assert "\n    axis_name: which ranks.\n    **loss_kwargs:" in across
    for line in across.splitlines() + numpy_losses.siglip_loss.__doc__.splitlines():
        assert len(line) <= 96, line


def test_a_backend_without_a_rank_argument():
    class Plain(AcrossRanks):
        pass

    losses = bind(_NumpyLossOps(), _docs(place_doc=""), Plain)
    assert list(inspect.signature(losses.across_ranks).parameters) == ["loss", "loss_kwargs"]
    assert repr(losses.across_ranks(losses.info_nce)) == "across_ranks(info_nce, **{})"
    assert ("\n    loss: :func:`info_nce`, :func:`clip_loss` or :func:`siglip_loss`.\n"
            "    **loss_kwargs") in losses.across_ranks.__doc__


def test_missing_tile_ops_are_named():
    class Partial(_tile_ops.InPlaceLoopOps):
        pass

    with pytest.raises(NotImplementedError, match="Partial must supply the tile op 'full'"):
        _tiled.tiled_forward(Partial(), _tiled.ROWS, np.eye(2), np.eye(2), 1.0, None, 1)


def test_per_tile_buffers_equal_in_place_ones():
    """:class:`gradcache._tile_ops.PerTileLoopOps` (TensorFlow eager's loop) over numpy, as if its
    arrays were immutable, against the in-place reference."""

    class PerTile(_tile_ops.PerTileLoopOps, _tiled.NumpyOps):
        def concat(self, pieces):
            return np.concatenate(pieces)

        def subtract_every(self, private, step, value, weight):
            private = private.copy()
            private[::step] -= weight * value
            return private

        def rescale(self, private, factor):
            return private * factor

    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(7, 3)), rng.normal(size=(14, 3))
    for kind in _tiled.KINDS:
        columns = y if kind == _tiled.ROWS else y[:7]
        beta = -0.5 if kind == _tiled.SIGMOID else None
        results = []
        for ops in (_tiled.NumpyOps(), PerTile()):
            value, rows, cols = _tiled.tiled_forward(ops, kind, x, columns, 1.5, beta, 3)
            grads = _tiled.tiled_backward(ops, kind, x, columns, 1.5, beta, rows, cols, 0.7, 3)
            results.append([value, *[g for g in grads if g is not None]])
        for got, want in zip(*reversed(results)):
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)


def test_module_examples():
    for module in (_tile_ops, _loss_api):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0, result


def test_the_binding_loads_no_framework():
    code = ("import sys, gradcache._loss_api, gradcache._tile_ops; "
            "bad = [m for m in ('torch', 'jax', 'tensorflow', 'keras', 'mlx') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("adapter, framework, place", [
    ("gradcache_torch", "torch", "group"),
    ("gradcache_jax", "jax", "axis_name"),
    ("gradcache_tf", "tensorflow", None),
    ("gradcache_mlx", "mlx", None),
])
def test_each_adapter_exposes_its_own_functions(adapter, framework, place):
    pytest.importorskip(framework)
    if framework == "tensorflow":
        import tests.tf  # noqa: F401  (TensorFlow's environment first, as the TF tests set it)
    losses = importlib.import_module(f"{adapter}.losses")
    assert sorted(losses.__all__) == sorted(NAMES)
    for name in NAMES:
        function = getattr(losses, name)
        assert function.__module__ == f"{adapter}.losses"
        assert function.__name__ == function.__qualname__ == name
        assert "{" not in function.__doc__
        if name != "across_ranks":
            assert f"from {adapter}.losses import {name}" in function.__doc__
            assert list(inspect.signature(function).parameters)[2:] == KEYWORDS[name]
    across = list(inspect.signature(losses.across_ranks).parameters)
    assert across == ["loss", "loss_kwargs"] if place is None else ["loss", place, "loss_kwargs"]
