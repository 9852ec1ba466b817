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

__version__ = "0.1.0"

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
