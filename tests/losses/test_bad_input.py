"""The tiled losses refuse bad scalar arguments and empty passages alike on every backend.

A temperature or scale of 0, a negative one, an infinite one or a NaN bias given as a number made
every loss NaN (or, negative, an objective that pushes positives apart) and wrote NaN gradients;
zero passages raised a bare ``ZeroDivisionError``. The checks live in
:mod:`gradcache._loss_forms`, so every backend's ``losses`` module (and ``across_ranks``) gets
them: one test body per case, run against torch, JAX and TensorFlow. A *tensor* temperature is
not read (it may be traced or learnt): what ``check_finite`` catches then is tested in
``tests/options/test_every_backend.py``.
"""

from __future__ import annotations

import importlib
import importlib.util

import numpy as np
import pytest

from gradcache import GradCacheError

BACKENDS = {"torch": "torch", "jax": "jax", "tf": "tensorflow"}


def _tensor(backend: str, array: np.ndarray):
    if backend == "torch":
        import torch
        return torch.from_numpy(array)
    if backend == "jax":
        import jax.numpy as jnp
        return jnp.asarray(array, dtype=jnp.float32)
    import tensorflow as tf
    return tf.constant(array)


@pytest.fixture(params=sorted(BACKENDS))
def backend(request) -> str:
    if importlib.util.find_spec(BACKENDS[request.param]) is None:
        pytest.skip(f"needs {BACKENDS[request.param]}")
    if request.param == "tf":
        import tests.tf  # noqa: F401  (TensorFlow's environment first, as the TF tests set it)
    return request.param


def _losses(backend: str):
    return importlib.import_module(f"gradcache_{backend}.losses")


def _pair(backend: str, rows: int = 3, columns: int = 3):
    rng = np.random.default_rng(0)
    return (_tensor(backend, rng.normal(size=(rows, 4)).astype(np.float32)),
            _tensor(backend, rng.normal(size=(columns, 4)).astype(np.float32)))


BAD_SCALARS = [
    ("info_nce", dict(temperature=0.0), "temperature must be a finite number > 0, got 0.0"),
    ("info_nce", dict(temperature=-0.1), "temperature must be a finite number > 0, got -0.1"),
    ("info_nce", dict(temperature=float("nan")), "temperature must be a finite number > 0"),
    ("info_nce", dict(temperature=True), "temperature must be a number or a scalar"),
    ("clip_loss", dict(logit_scale=float("inf")), "logit_scale must be a finite number > 0"),
    ("clip_loss", dict(logit_scale=0), "logit_scale must be a finite number > 0, got 0"),
    ("siglip_loss", dict(logit_scale=-10.0), "logit_scale must be a finite number > 0"),
    ("siglip_loss", dict(logit_bias=float("nan")), "logit_bias must be a finite number, got nan"),
    ("siglip_loss", dict(logit_bias=np.float32("-inf")), "logit_bias must be a finite number"),
]


@pytest.mark.parametrize("dense", [False, True], ids=["tiled", "dense"])
@pytest.mark.parametrize("loss, kwargs, message", BAD_SCALARS,
                         ids=[f"{loss}-{next(iter(kw))}={next(iter(kw.values()))}"
                              for loss, kw, _ in BAD_SCALARS])
def test_a_bad_scalar_is_named(backend: str, loss: str, kwargs: dict, message: str,
                               dense: bool) -> None:
    function = getattr(_losses(backend), f"{loss}_dense" if dense else loss)
    with pytest.raises(GradCacheError, match=f"{loss}(_dense)?: {message}"):
        function(*_pair(backend), **kwargs)


def test_across_ranks_refuses_a_bad_scalar_when_it_is_made(backend: str) -> None:
    losses = _losses(backend)
    place = {"jax": {"axis_name": "batch"}}.get(backend, {})
    with pytest.raises(GradCacheError, match=r"across_ranks\(info_nce, \.\.\.\): temperature "
                                             r"must be a finite number > 0, got 0"):
        losses.across_ranks(losses.info_nce, temperature=0, **place)


@pytest.mark.parametrize("name", ["info_nce", "info_nce_dense"])
def test_zero_passages_are_named(backend: str, name: str) -> None:
    with pytest.raises(GradCacheError, match=rf"{name}: there are no passages .*\(0, 4\)"):
        getattr(_losses(backend), name)(*_pair(backend, columns=0))


def test_a_good_scalar_still_passes(backend: str) -> None:
    losses = _losses(backend)
    q, p = _pair(backend)
    for value in (losses.info_nce(q, p, temperature=np.float64(0.5)),
                  losses.siglip_loss(q, p, logit_scale=1, logit_bias=0)):
        assert np.isfinite(float(np.asarray(value)))
