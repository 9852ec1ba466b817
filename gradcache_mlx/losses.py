"""The tiled contrastive losses in MLX: ``info_nce``, ``clip_loss``, ``siglip_loss`` and their dense
references, written once in the core (:mod:`gradcache._loss_forms`) over the MLX ops below.

MLX arrays are immutable, so the sweeps keep their accumulators as one array per tile
(:class:`gradcache._tile_ops.PerTileLoopOps`); the summed loss is an ``mx.custom_function`` whose
VJP is the backward sweep. Each tile is evaluated before the next (and, inside a transform, cut
from the graph MLX would keep), so that only one tile of logits exists at a time. MLX's float64
``exp`` on the CPU is only float32-accurate, so float64 uses ``pow`` instead. There is no
distributed step in MLX yet: ``across_ranks`` raises.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from gradcache import GradCacheError
from gradcache._loss_api import AcrossRanks, LossDocs, bind
from gradcache._loss_forms import LossOps
from gradcache._tile_ops import PerTileLoopOps
from gradcache_mlx._step import _settle


class MLXOps(PerTileLoopOps, LossOps):
    """:class:`gradcache._loss_forms.LossOps` over MLX, looping over tiles in Python."""

    log = staticmethod(mx.log)
    log1p = staticmethod(mx.log1p)
    maximum = staticmethod(mx.maximum)
    where = staticmethod(mx.where)

    def exp(self, x: Any) -> Any:
        # MLX's float64 exp on the CPU is a float32-accurate approximation (relative error ~3e-6);
        # its pow is exact
        return mx.power(mx.array(math.e, dtype=x.dtype), x) if x.dtype == mx.float64 else mx.exp(x)

    def logsumexp(self, x: Any, axis: int) -> Any:
        if x.dtype != mx.float64:
            return mx.logsumexp(x, axis=axis)
        top = mx.max(x, axis=axis, keepdims=True)
        top = mx.where(mx.isinf(top), 0.0, top)   # a masked-out line: log(0) = -inf
        return mx.squeeze(self.log(mx.sum(self.exp(x - top), axis=axis, keepdims=True)) + top,
                          axis=axis)

    def full(self, shape: tuple, fill: float, like: Any) -> Any:
        return mx.full(shape, fill, dtype=like.dtype)

    def arange(self, size: int, like: Any) -> Any:
        return mx.arange(size)

    def concat(self, pieces: list) -> Any:
        return mx.concatenate(pieces, axis=0)

    def subtract_every(self, private: Any, step: int, value: Any, weight: float) -> Any:
        return private.at[::step].subtract(weight * value)

    def settle(self, values: list) -> list:
        try:
            return _settle(values, inside_transform=True)
        except GradCacheError:   # inside mx.compile: the compiled graph runs as a whole
            return values

    def custom_gradient(self, forward: Callable, backward: Callable, inputs: tuple) -> Any:
        present = [index for index, value in enumerate(inputs) if value is not None]
        saved: list = []

        def complete(args: Any) -> list:
            values: list = [None] * len(inputs)
            for index, arg in zip(present, args):
                values[index] = arg
            return values

        @mx.custom_function
        def summed(*args: Any) -> Any:
            value, kept = forward(*complete(args))
            saved[:] = [kept]
            return value

        @summed.vjp
        def pullback(primals: tuple, cotangent: Any, output: Any) -> tuple:
            kept = saved[0] if saved else forward(*complete(primals))[1]
            grads = backward(kept, cotangent)
            return tuple(mx.zeros_like(primal) if grads[index] is None else grads[index]
                         for index, primal in zip(present, primals))

        return summed(*[inputs[index] for index in present])

    def prepare(self, x: Any) -> Any:
        x = x if isinstance(x, mx.array) else mx.array(x)
        return x.astype(mx.float32) if x.dtype in (mx.float16, mx.bfloat16) else x

    def as_scalar(self, value: Any, like: Any) -> Any:
        if not isinstance(value, mx.array):
            return mx.array(value, dtype=like.dtype)
        if value.size != 1:
            raise GradCacheError(f"a temperature, scale or bias is a scalar, got shape {value.shape}")
        return value.astype(like.dtype).reshape(())

    def normalize(self, x: Any) -> Any:
        return x / mx.linalg.norm(x, axis=-1, keepdims=True)

    def on_accelerator(self, x: Any) -> bool:
        return mx.default_device() == mx.gpu

    def cross_entropy(self, logits: Any, step: int) -> Any:
        # over self.logsumexp: MLX's own cross-entropy takes exp in float32 precision
        rows = mx.arange(logits.shape[0])
        return mx.mean(self.logsumexp(logits, 1) - logits[rows, rows * step])

    def sigmoid_loss(self, logits: Any) -> Any:
        labels = 2 * mx.eye(logits.shape[0], dtype=logits.dtype) - 1
        if logits.dtype != mx.float64:
            return -mx.sum(nn.log_sigmoid(labels * logits))
        return mx.sum(self.softplus(-labels * logits))


class _AcrossRanks(AcrossRanks):
    def collective_for(self, x: Any, y: Any) -> Any:
        raise GradCacheError("gradcache_mlx has no distributed step yet: across_ranks cannot run")


_EXAMPLE = """
    >>> import mlx.core as mx
    >>> from gradcache_mlx.losses import {name}
    >>> x, y = mx.random.normal((8, 4)), mx.random.normal((8, 4))
    >>> loss, grads = mx.value_and_grad(lambda x, y: {name}(x, y{extra}), argnums=(0, 1))(x, y)
    >>> loss.shape, grads[0].shape
    ((), (8, 4))
    """

_DOCS = LossDocs(
    module="gradcache_mlx.losses",
    array_type=mx.array,
    tensor="array",
    learnable="a parameter of the ``nn.Module`` that ``nn.value_and_grad`` differentiates",
    log_scale="``mx.exp(model.log_scale)``",
    autodiff="MLX autodiff",
    gradients="""
        MLX differentiates it through an ``mx.custom_function`` (``mx.grad``,
        ``nn.value_and_grad``), and it works as the ``loss_fn`` of ``gradcache_mlx.cached_step``.
        """,
    examples={name: _EXAMPLE.format(name=name, extra=", tile_size=3" if "dense" not in name
                                    else "")
              for name in ("info_nce", "clip_loss", "siglip_loss", "info_nce_dense",
                           "clip_loss_dense", "siglip_loss_dense")},
    unit="rank",
    ranks="several processes",
    communicates="would gather the columns and scatter their gradients",
    specifics="gradcache_mlx has no distributed step yet: calling the result raises "
              "``GradCacheError``.",
)

_OPS = MLXOps()

(info_nce, clip_loss, siglip_loss, info_nce_dense, clip_loss_dense, siglip_loss_dense,
 across_ranks) = bind(_OPS, _DOCS, _AcrossRanks)

__all__ = ["across_ranks", "clip_loss", "clip_loss_dense", "info_nce", "info_nce_dense",
           "siglip_loss", "siglip_loss_dense"]
