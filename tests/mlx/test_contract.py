"""The shared contract suite, run against the MLX backend (float64 and float32, MLX's CPU)."""

import pytest

pytest.importorskip("mlx.core")

from gradcache.testing.contract import BackendContract  # noqa: E402
from tests.mlx.harness import MLXHarness  # noqa: E402


class TestMLXContract(BackendContract):
    harness = MLXHarness()
