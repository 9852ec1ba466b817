"""The tiled contrastive losses assembled once, over the few differentiable ops a backend supplies.

Each loss is a constant times its summed loss ``S`` (:mod:`gradcache._tiled`), which each backend
computes inside its own custom-gradient function. Around it, only ``O(B·d)`` work is left to the
framework's autodiff: the cosine normalisation and turning the temperature into the logits' scale.
A learnable temperature, logit scale or bias therefore gets its gradient from the framework,
exactly once, through the scalar it became. This module also checks shapes and arguments, so that
every backend words its errors alike. It must never import a framework.
"""

from __future__ import annotations

from typing import Any, Protocol

from gradcache._errors import GradCacheError
from gradcache._tiled import ROWS, ROWS_AND_COLUMNS, SIGMOID, check_tile_size

SIMILARITIES = ("dot", "cosine")

#: Initial values of the losses' parameters in the papers that introduced them: the temperature of
#: sentence-transformers' multiple-negatives ranking loss (scale 20), CLIP's 1/0.07 and SigLIP's
#: ``t = 10, b = -10``.
DEFAULT_TEMPERATURE = 0.05
DEFAULT_CLIP_SCALE = 1 / 0.07
DEFAULT_SIGLIP_SCALE = 10.0
DEFAULT_SIGLIP_BIAS = -10.0


class LossOps(Protocol):
    """The differentiable operations the assembly needs (the backend's autodiff sees them all)."""

    def tiled_sum(self, kind: str, x: Any, y: Any, alpha: Any, beta: Any, tile: int) -> Any: ...
    def shape(self, x: Any) -> tuple: ...
    def prepare(self, x: Any) -> Any: ...
    def as_scalar(self, value: Any, like: Any) -> Any: ...
    def normalize(self, x: Any) -> Any: ...
    def on_accelerator(self, x: Any) -> bool: ...


def check_pair(ops: LossOps, x: Any, y: Any, loss: str, *, square: bool) -> tuple[int, int]:
    """``(rows of x, rows of y)``, or a GradCacheError naming the shapes.

    >>> class Shapes:
    ...     def shape(self, x): return x
    >>> check_pair(Shapes(), (4, 8), (12, 8), "info_nce", square=False)
    (4, 12)
    """
    x_shape, y_shape = tuple(ops.shape(x)), tuple(ops.shape(y))
    if len(x_shape) != 2 or len(y_shape) != 2:
        raise GradCacheError(f"{loss} takes two (batch, dim) matrices, got shapes {x_shape} and "
                             f"{y_shape}")
    if x_shape[1] != y_shape[1]:
        raise GradCacheError(f"{loss}: the representations differ in width: {x_shape} and {y_shape}")
    if None in x_shape[:1] + y_shape[:1]:
        raise GradCacheError(f"{loss} needs static batch sizes (tiles are planned when traced), got "
                             f"shapes {x_shape} and {y_shape}")
    n, m = x_shape[0], y_shape[0]
    if n == 0:
        raise GradCacheError(f"{loss}: the batch is empty ({x_shape})")
    if square and m != n:
        raise GradCacheError(f"{loss} pairs row i of x with row i of y, so both need the same number "
                             f"of rows; got {x_shape} and {y_shape}")
    if not square and m % n:
        raise GradCacheError(
            f"{loss}: passages {y_shape} must hold the same number of rows for every query "
            f"{x_shape} (positive first, then its hard negatives), so a multiple of {n}")
    return n, m


def prepare(ops: LossOps, x: Any, y: Any, similarity: str, loss: str) -> tuple[Any, Any]:
    """Half-precision inputs in float32, unit rows for ``similarity="cosine"``."""
    if similarity not in SIMILARITIES:
        raise GradCacheError(f"{loss}: similarity must be one of {SIMILARITIES}, got {similarity!r}")
    x, y = ops.prepare(x), ops.prepare(y)
    if similarity == "cosine":
        x, y = ops.normalize(x), ops.normalize(y)
    return x, y


def info_nce(ops: LossOps, q: Any, p: Any, temperature: Any, similarity: str,
             tile_size: Any) -> Any:
    """InfoNCE with in-batch and hard negatives: ``mean_i [lse_j(s_ij / t) - s_i,pos(i) / t]``.

    ``p`` holds ``k + 1`` rows per query, query ``i``'s positive first at row ``i * (k + 1)``; every
    query is scored against every row of ``p``.
    """
    tile = check_tile_size(tile_size, accelerator=ops.on_accelerator(q))
    n, _ = check_pair(ops, q, p, "info_nce", square=False)
    q, p = prepare(ops, q, p, similarity, "info_nce")
    alpha = 1 / ops.as_scalar(temperature, q)
    return ops.tiled_sum(ROWS, q, p, alpha, None, tile) / n


def clip_loss(ops: LossOps, x: Any, y: Any, logit_scale: Any, similarity: str,
              tile_size: Any) -> Any:
    """Symmetric CLIP loss: the mean of InfoNCE over rows and over columns of ``scale * x y^T``."""
    tile = check_tile_size(tile_size, accelerator=ops.on_accelerator(x))
    n, _ = check_pair(ops, x, y, "clip_loss", square=True)
    x, y = prepare(ops, x, y, similarity, "clip_loss")
    alpha = ops.as_scalar(logit_scale, x)
    return ops.tiled_sum(ROWS_AND_COLUMNS, x, y, alpha, None, tile) / (2 * n)


def siglip_loss(ops: LossOps, x: Any, y: Any, logit_scale: Any, logit_bias: Any,
                similarity: str, tile_size: Any) -> Any:
    """SigLIP: ``-(1/n) sum_ij log sigmoid(l_ij (scale s_ij + bias))``, ``l = 2 I - 1``.

    ``-log sigmoid(u) = softplus(-u)``: ``n`` times the loss is the ``SIGMOID`` summed loss.
    """
    tile = check_tile_size(tile_size, accelerator=ops.on_accelerator(x))
    n, _ = check_pair(ops, x, y, "siglip_loss", square=True)
    x, y = prepare(ops, x, y, similarity, "siglip_loss")
    alpha = ops.as_scalar(logit_scale, x)
    beta = ops.as_scalar(logit_bias, x)
    return ops.tiled_sum(SIGMOID, x, y, alpha, beta, tile) / n
