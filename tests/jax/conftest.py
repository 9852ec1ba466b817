"""JAX test settings: float64 for the contract's tolerances, switched on per test and never globally.

The torch and TensorFlow folders run in the same pytest process, so ``jax_enable_x64`` must not be
set with ``jax.config.update``: an autouse fixture turns it on in JAX's thread-local context for
the duration of each test of this folder only, and the context puts the old value back on exit.
Without JAX installed the folder is skipped at collection.
"""

import pytest

try:
    import jax
except ImportError:  # pragma: no cover - exercised only without jax
    collect_ignore_glob = ["test_*.py"]
else:

    @pytest.fixture(autouse=True)
    def _float64_inside_this_folder():
        with jax.enable_x64(True):
            yield
