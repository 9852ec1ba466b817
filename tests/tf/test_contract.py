"""The shared contract suite, run against the TF backend: eagerly, inside ``tf.function`` and
under XLA, with a ``tf.Module`` encoder (``tf.random.Generator`` dropout) and a Keras layer
(``SeedGenerator`` dropout). Every draw inside ``tf.function`` traces anew (and under XLA
compiles anew), so those classes run fewer examples; ``max_examples`` bounds each property test.
"""

from __future__ import annotations

import pytest

from gradcache.testing.contract import BackendContract
from tests.tf.conftest import keras_or_skip
from tests.tf.harness import TFHarness


class TestEagerModuleContract(BackendContract):
    harness = TFHarness("eager", "module")
    max_examples = 15


class TestFunctionModuleContract(BackendContract):
    harness = TFHarness("function", "module")
    max_examples = 6


class TestXlaModuleContract(BackendContract):
    harness = TFHarness("xla", "module")
    max_examples = 3


class _KerasContract(BackendContract):
    @pytest.fixture(autouse=True)
    def _needs_keras(self) -> None:
        keras_or_skip()


class TestEagerKerasContract(_KerasContract):
    harness = TFHarness("eager", "keras")
    max_examples = 10


class TestFunctionKerasContract(_KerasContract):
    harness = TFHarness("function", "keras")
    max_examples = 5
