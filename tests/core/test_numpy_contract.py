"""The shared contract suite against the framework-free numpy backend: the core proven alone."""

from gradcache.testing.contract import BackendContract
from tests.core.harness import NumpyHarness


class TestNumpyContract(BackendContract):
    harness = NumpyHarness()


def test_a_gradient_zero_but_for_rounding_passes_in_float64():
    """Every input dropped (MLX's contract drew it): identical rows, a zero gradient that one
    reference computes as 0 and the other as -2.8e-17. Rounding, not a wrong gradient."""
    import numpy as np
    import pytest

    from gradcache.testing.contract import Result, assert_results_close

    zero = Result(1.6094379124341005, {"b": np.array([0.0, 0.0])})
    rounded = Result(1.6094379124341005, {"b": np.array([-2.77555756e-17, 0.0])})
    assert_results_close(zero, rounded, "float64")
    with pytest.raises(AssertionError):   # a real difference still fails
        assert_results_close(zero, Result(1.6094379124341005, {"b": np.array([1e-9, 0.0])}),
                             "float64")
    assert_results_close(zero, Result(1.6094379, {"b": np.array([-1.5e-8, 0.0])}), "float32")
    with pytest.raises(AssertionError):
        assert_results_close(zero, Result(1.6094379, {"b": np.array([1e-6, 0.0])}), "float32")
