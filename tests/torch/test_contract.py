"""The shared contract suite, run against the torch backend."""

from gradcache.testing.contract import BackendContract
from tests.torch.harness import TorchHarness


class TestTorchContract(BackendContract):
    harness = TorchHarness()
