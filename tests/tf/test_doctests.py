"""The ``>>>`` examples of the TF adapter's public functions run as written."""

from __future__ import annotations

import doctest
import importlib

import pytest

import tests.tf  # noqa: F401


@pytest.mark.parametrize("module", ["gradcache_tf._step", "gradcache_tf._loss", "gradcache_tf._rng",
                                    "gradcache_tf._keras"])
def test_doctests(module: str) -> None:
    if module.endswith("_keras"):
        from tests.tf.conftest import keras_or_skip
        keras_or_skip()
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
