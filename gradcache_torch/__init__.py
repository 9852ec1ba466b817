"""gradcache for PyTorch: ``cached_step`` puts full-batch-exact gradients into ``.grad``;
``cached_loss`` returns the loss, and its ``backward()`` does.

Also here: the migration API of the original GradCache package (``GradCache``, ``cached``,
``cat_input_tensor``) without its defects, the backend for anyone composing their own step, and
``TorchCollective`` / ``all_gather_rows`` for distributed steps (``cached_step(..., distributed=True)``).
"""

try:
    import torch  # noqa: F401
except ImportError:  # pragma: no cover - exercised only without torch
    from gradcache._distribution import install_hint

    raise ImportError(f"gradcache_torch needs PyTorch: {install_hint('torch')}") from None

from gradcache import GradCacheError
from gradcache_torch._backend import TorchBackend, trim_padding
from gradcache_torch._compat import GradCache, cached, cat_input_tensor
from gradcache_torch._distributed import TorchCollective, all_gather_rows
from gradcache_torch._loss import cached_loss
from gradcache_torch._rng import RngState
from gradcache_torch._step import cached_step

__all__ = [
    "GradCache",
    "GradCacheError",
    "RngState",
    "TorchBackend",
    "TorchCollective",
    "all_gather_rows",
    "cached",
    "cached_loss",
    "cached_step",
    "cat_input_tensor",
    "trim_padding",
]
