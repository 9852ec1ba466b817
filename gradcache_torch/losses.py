"""Contrastive losses for PyTorch whose memory grows linearly in the batch: InfoNCE, CLIP, SigLIP.

``info_nce``, ``clip_loss`` and ``siglip_loss`` never hold more than one ``tile x tile`` block of
logits: each is a ``torch.autograd.Function`` whose forward sweeps the tiles under no graph,
keeping only the representations and one log-sum-exp per row (and column), and whose backward
recomputes each tile once and returns the gradients of the representations and of the logits'
scale and bias (the sweeps are :mod:`gradcache._tiled`, shared by every backend). The rest --
cosine normalisation, turning a temperature into a scale -- is ordinary autograd, so a learnable
temperature, logit scale or bias is an ``nn.Parameter`` like any other and gets its gradient once.
``*_dense`` are the same losses written plainly (a ``B x B`` matrix), the reference the tiled ones
equal. Use them directly or as the ``loss_fn`` of :func:`gradcache_torch.cached_step`; see
``docs/losses.md``.

:func:`across_ranks` turns one of them into the loss of the global batch of a process group, each
rank computing only its own rows' share: one all-gather and one reduce-scatter of ``B x d`` numbers
per step (:mod:`gradcache._loss_forms`).

This module holds torch's part only: its primitives of :class:`gradcache._loss_forms.LossOps` (the
array primitives, the ``autograd.Function`` around the sweeps, the differentiable ops), its
collective for ``across_ranks`` and its pieces of the docstrings. The public functions are written once in
:mod:`gradcache._loss_api` and bound here.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from gradcache._loss_api import AcrossRanks, LossDocs, bind
from gradcache._loss_forms import LossOps
from gradcache._tile_ops import InPlaceLoopOps
from gradcache_torch._distributed import TorchCollective

__all__ = [
    "across_ranks",
    "clip_loss",
    "clip_loss_dense",
    "info_nce",
    "info_nce_dense",
    "siglip_loss",
    "siglip_loss_dense",
]


class _Summed(torch.autograd.Function):
    """:meth:`gradcache._loss_forms.LossOps.custom_gradient` over autograd: the summed loss S.
    Given a collective, its backward communicates too, so every rank of the group must run it (as
    every rank runs the forward). Under autocast the tiles' products would run in half precision:
    the sweeps keep the inputs' dtype (float32 at least, see ``prepare``)."""

    @staticmethod
    def forward(ctx: Any, forward: Any, backward: Any, *inputs: Any) -> torch.Tensor:
        with torch.autocast(inputs[0].device.type, enabled=False):
            value, saved = forward(*inputs)
        ctx.backward = backward
        ctx.save_for_backward(*saved)
        return value

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        with torch.autocast(grad.device.type, enabled=False):
            grads = ctx.backward(ctx.saved_tensors, grad)
        return (None, None, *grads)


class _Ops(LossOps, InPlaceLoopOps):
    """:class:`gradcache._loss_forms.LossOps` over torch: Python tile loops, accumulators updated
    in place (:class:`gradcache._tile_ops.InPlaceLoopOps`); the primitives, and torch's fast
    ``exp``."""

    exp = staticmethod(torch.exp)
    log = staticmethod(torch.log)
    maximum = staticmethod(torch.maximum)

    def where(self, condition: torch.Tensor, a: Any, b: Any, /) -> torch.Tensor:
        # a method, not staticmethod(torch.where): that would type as torch.where's first
        # overload, the one-argument nonzero form
        return torch.where(condition, a, b)

    def full(self, shape: tuple, fill: float, like: torch.Tensor) -> torch.Tensor:
        return torch.full(shape, fill, dtype=like.dtype, device=like.device)

    def arange(self, size: int, like: torch.Tensor | None) -> torch.Tensor:
        return torch.arange(size, device=None if like is None else like.device)

    # torch's CPU exp is 10-30x slower on arguments near or below log(smallest normal) (-87 in float32),
    # where its result is a denormal or zero; the tiles are full of such arguments. Raising them to
    # that bound changes each result by less than the smallest normal number, far below rounding.
    @staticmethod
    def _floor(x: torch.Tensor) -> float:
        return math.log(torch.finfo(x.dtype).tiny) + 1.0  # at the bound itself it is slow again

    def expdiff(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        difference = torch.sub(a, b)
        return difference.clamp_(min=self._floor(difference)).exp_()

    def softplus(self, x: torch.Tensor) -> torch.Tensor:
        # max(x, 0) + log1p(exp(-|x|)); F.softplus returns x itself above 20 (an error of 2e-9)
        tail = x.abs().neg_().clamp_(min=self._floor(x)).exp_().log1p_()
        return tail.add_(x.clamp(min=0))

    def sigmoid(self, x: torch.Tensor) -> torch.Tensor:
        bound = -self._floor(x)
        return torch.sigmoid(x.clamp(-bound, bound))

    def logsumexp(self, x: torch.Tensor, axis: int) -> torch.Tensor:
        top = x.amax(dim=axis, keepdim=True)
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        return self.expdiff(x, top).sum(dim=axis).log_().add_(top.squeeze(axis))

    # -- the differentiable ops around the sweeps ---------------------------------------------------
    def custom_gradient(self, forward: Any, backward: Any, inputs: tuple) -> torch.Tensor:
        return _Summed.apply(forward, backward, *inputs)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x

    def as_scalar(self, value: Any, like: torch.Tensor) -> torch.Tensor:
        if isinstance(value, torch.Tensor):
            return value.to(like.dtype).reshape(())
        return torch.tensor(float(value), dtype=like.dtype, device=like.device)

    def on_accelerator(self, x: Any) -> bool:
        return isinstance(x, torch.Tensor) and x.device.type != "cpu"

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1)

    def cross_entropy(self, logits: torch.Tensor, step: int) -> torch.Tensor:
        labels = torch.arange(logits.shape[0], device=logits.device) * step
        return F.cross_entropy(logits, labels)

    def sigmoid_loss(self, logits: torch.Tensor) -> torch.Tensor:
        labels = 2 * torch.eye(logits.shape[0], dtype=logits.dtype, device=logits.device) - 1
        return -F.logsigmoid(labels * logits).sum()


_OPS = _TILE_OPS = _Ops()


class _AcrossRanks(AcrossRanks):
    """What :func:`across_ranks` returns: call it with this rank's rows."""

    place, place_default = "group", None
    group: Any  # set by AcrossRanks.__init__ (place)

    def __init__(self, *args: Any):
        super().__init__(*args)
        #: the :class:`gradcache_torch._distributed.TorchCollective` of the calls so far (made at
        #: the first, when the process group exists; it counts the bytes it moved)
        self.collective: Any = None

    def collective_for(self, x: torch.Tensor, y: torch.Tensor) -> TorchCollective:
        if self.collective is None:
            self.collective = TorchCollective(self.group)
        return self.collective


_DOCS = LossDocs(
    module=__name__,
    array_type=torch.Tensor,
    tensor="tensor",
    learnable="an ``nn.Parameter``",
    log_scale="``log_scale.exp()``",
    autodiff="autograd",
    gradients="""
        A ``torch.autograd.Function``: ``backward()`` gives the representations and a learnable
        parameter their gradients (in the inputs' dtype; the tiles run in float32 at least, autocast
        or not).
    """,
    unit="rank",
    ranks="a process group",
    communicates="""
        all-gathers ``y`` and reduce-scatters its gradient (``B x d`` numbers each) plus scalars
        (and, for CLIP, one ``B``-vector per rank)
    """,
    specifics="""
        A learnable temperature, scale or bias gets the global gradient, identical on every rank.
        Ranks may hold different numbers of rows; for ``info_nce`` each rank's ``y_local`` holds
        ``k + 1`` rows per local query, the same ``k`` everywhere. As the ``loss_fn`` of
        ``cached_step(..., distributed=True)`` it is given each rank's own representations
        (``gathers_itself``).
    """,
    place_doc="""
        group: the ``torch.distributed`` process group (``None``: the default one).
    """,
    examples={
        "info_nce": """
            >>> import torch
            >>> from gradcache_torch.losses import info_nce, info_nce_dense
            >>> q = torch.randn(6, 4, dtype=torch.float64)
            >>> p = torch.randn(12, 4, dtype=torch.float64)   # one hard negative per query
            >>> loss = info_nce(q, p, temperature=0.1, tile_size=4)
            >>> bool(torch.allclose(loss, info_nce_dense(q, p, temperature=0.1)))
            True
        """,
        "clip_loss": """
            >>> import torch
            >>> from gradcache_torch.losses import clip_loss, clip_loss_dense
            >>> x = torch.randn(5, 3, dtype=torch.float64)
            >>> y = torch.randn(5, 3, dtype=torch.float64)
            >>> scale = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
            >>> clip_loss(x, y, logit_scale=scale, tile_size=2).backward()
            >>> scale.grad.shape
            torch.Size([])
        """,
        "siglip_loss": """
            >>> import torch
            >>> from gradcache_torch.losses import siglip_loss, siglip_loss_dense
            >>> x = torch.randn(5, 3, dtype=torch.float64)
            >>> y = torch.randn(5, 3, dtype=torch.float64)
            >>> bool(torch.allclose(siglip_loss(x, y, tile_size=2), siglip_loss_dense(x, y)))
            True
        """,
        "info_nce_dense": """
            >>> import torch
            >>> from gradcache_torch.losses import info_nce_dense
            >>> info_nce_dense(torch.eye(3), torch.eye(3), temperature=1.0).shape
            torch.Size([])
        """,
        "clip_loss_dense": """
            >>> import torch
            >>> from gradcache_torch.losses import clip_loss_dense
            >>> clip_loss_dense(torch.eye(3), torch.eye(3), logit_scale=1.0).shape
            torch.Size([])
        """,
        "siglip_loss_dense": """
            >>> import torch
            >>> from gradcache_torch.losses import siglip_loss_dense
            >>> siglip_loss_dense(torch.eye(3), torch.eye(3)).shape
            torch.Size([])
        """,
    },
)

(info_nce, clip_loss, siglip_loss, info_nce_dense, clip_loss_dense, siglip_loss_dense,
 across_ranks) = bind(_OPS, _DOCS, _AcrossRanks)
