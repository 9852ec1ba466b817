"""Fixtures of the TF tests; every global TensorFlow or Keras setting a test changes is put back.

The torch and JAX tests run in the same pytest process, so nothing here may leak: the Keras dtype
policy is restored after each test that sets it, no logical devices are configured, no global seed
is set (tests seed their own generators), and Keras is skipped when another backend owns it.
"""

from __future__ import annotations

import pytest

import tests.tf  # noqa: F401  (environment first)

tf = pytest.importorskip("tensorflow")


def keras_or_skip():
    """Keras 3 on the TensorFlow backend, or skip the test."""
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "tensorflow":
        pytest.skip(f"Keras runs on {keras.backend.backend()} in this process, not TensorFlow")
    return keras


@pytest.fixture
def keras():
    return keras_or_skip()


@pytest.fixture
def mixed_precision(keras):
    """Sets Keras' global dtype policy to mixed_float16 for one test, then restores it."""
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        yield keras
    finally:
        keras.mixed_precision.set_global_policy(previous)
