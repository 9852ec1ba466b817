"""The shared contract suite against the framework-free numpy backend: the core proven alone."""

from gradcache.testing.contract import BackendContract
from tests.core.harness import NumpyHarness


class TestNumpyContract(BackendContract):
    harness = NumpyHarness()
