"""gradcache: gradient caching for contrastive learning, exact and framework-neutral.

The core holds the algorithm -- chunking of nested inputs, the two-pass schedule, random-state
bookkeeping, validation and errors -- written once against the small :class:`Backend` protocol.
Adapters (``gradcache_torch``, ``gradcache_jax``, ``gradcache_tf``, ``gradcache_mlx``) implement
that protocol for their framework. Importing this package loads no framework, ever.

>>> import gradcache
>>> gradcache.ChunkPlan.uniform(batch_size=10, chunk_size=4).bounds
[(0, 4), (4, 8), (8, 10)]
"""

from gradcache._backend import Backend, ChunkPlan, call_with_convention
from gradcache._collective import Collective, Rendezvous
from gradcache._dispatch import cached_step
from gradcache._errors import GradCacheError
from gradcache._options import StepKeywords, StepOptions
from gradcache._schedule import (
    CachedForward,
    CheckedLoss,
    cached_backward,
    cached_forward,
    run_cached_step,
)
from gradcache._tree import TreeSpec, flatten, map_leaves, unflatten

# The one version of the distribution (pyproject.toml reads it from here).
__version__ = "0.1.0"


def _warn_if_the_original_is_installed() -> None:
    # The original GradCache distribution installs a `gradcache` module too: one line, at import,
    # with the command that fixes it (gradcache._distribution says why it matters).
    import warnings

    from gradcache._distribution import conflicting_original

    problem = conflicting_original()
    if problem:
        warnings.warn(problem, UserWarning, stacklevel=3)


_warn_if_the_original_is_installed()

__all__ = [
    "Backend",
    "CachedForward",
    "CheckedLoss",
    "ChunkPlan",
    "Collective",
    "GradCacheError",
    "TreeSpec",
    "cached_backward",
    "cached_forward",
    "cached_step",
    "call_with_convention",
    "flatten",
    "map_leaves",
    "Rendezvous",
    "StepKeywords",
    "StepOptions",
    "run_cached_step",
    "unflatten",
]
