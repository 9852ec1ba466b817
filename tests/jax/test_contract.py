"""The shared contract suite, run against the JAX backend under ``jax.jit`` and eagerly.

Every hypothesis draw has new shapes, hence a new compilation, so the property tests run fewer
examples here than the suite's default: ``max_examples`` and ``examples_for`` on each subclass
bound them.
"""

from __future__ import annotations

from gradcache.testing.contract import BackendContract
from tests.jax.harness import JaxHarness


class TestJaxJitContract(BackendContract):
    harness = JaxHarness(jit=True)
    max_examples = 12
    # random generators in every chunk loop: the costliest programs to compile
    examples_for = {"test_dropout_replays_the_chunked_reference": 6,
                    "test_failure_leaves_gradients_untouched": 6}


class TestJaxEagerContract(BackendContract):
    """Eager steps run the same scanned loop, but compile each remaining operation on its own."""

    harness = JaxHarness(jit=False)
    max_examples = 2
    examples_for: dict = {}
