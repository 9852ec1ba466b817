"""The public loss functions and their documentation, written once and bound to each backend.

Every adapter's ``losses`` module exposes the same seven names -- ``info_nce``, ``clip_loss``,
``siglip_loss``, their ``*_dense`` references and ``across_ranks`` -- with the same keyword
arguments, defaults, checks and documentation; only the framework underneath differs. :func:`bind` makes them
from a backend's :class:`gradcache._loss_forms.LossOps`, in the spirit of array-api-compat binding
generic functions to an array namespace: each is a real function with the adapter's
``__module__``, its own ``__name__`` and ``__qualname__``, the signature users see (its keyword
arguments and defaults, annotated with the framework's array type) and a docstring written here
once, with the backend's pieces filled in (:class:`LossDocs`: its examples, the word for its
tensors, how a parameter is learnt and where gradients go, the ``group=`` / ``axis_name=`` argument
of ``across_ranks``). The functions do no more than call :mod:`gradcache._loss_forms`, so binding
costs nothing per call. This module must never import a framework.
"""

from __future__ import annotations

import inspect
import re
import textwrap
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from gradcache import _loss_forms
from gradcache._collective import Collective
from gradcache._loss_forms import (
    DEFAULT_CLIP_SCALE,
    DEFAULT_SIGLIP_BIAS,
    DEFAULT_SIGLIP_SCALE,
    DEFAULT_TEMPERATURE,
    LossOps,
)

#: ``place_default`` of an ``across_ranks`` argument that the caller must give (JAX's axis name).
REQUIRED = inspect.Parameter.empty


@dataclass(frozen=True)
class LossDocs:
    """A backend's pieces of the shared docstrings (each a reStructuredText fragment)."""

    #: where the functions live, e.g. ``"gradcache_torch.losses"`` (their ``__module__``)
    module: str
    #: the framework's array type, for the signatures' annotations
    array_type: Any
    #: what the framework calls an array (``"tensor"``)
    tensor: str
    #: what makes a parameter learnable (``"an ``nn.Parameter``"``)
    learnable: str
    #: a scale computed from a learnable log (``"``log_scale.exp()``"``)
    log_scale: str
    #: the framework's differentiation (``"autograd"``)
    autodiff: str
    #: a paragraph of the tiled losses' docstrings: how the framework differentiates them and
    #: where the gradients go
    gradients: str
    #: each function's ``>>>`` example, by name (the six losses)
    examples: Mapping[str, str]
    #: ``across_ranks``: what one share of the batch is called (``"rank"``, ``"device"``)
    unit: str
    #: ``across_ranks``: whose global batch (``"a process group"``)
    ranks: str
    #: ``across_ranks``: what its callable moves per call, after "per call it"
    communicates: str
    #: ``across_ranks``: the backend's own paragraph (learnable parameters, unequal rows, ...)
    specifics: str
    #: ``across_ranks``: where its callable is called, a clause after "The returned callable"
    where: str = ""
    #: ``across_ranks``: the Args entry of its argument naming the ranks, if it has one
    place_doc: str = ""
    #: after "``(B, d)`` representations" of the tiled losses' first argument (static shapes)
    rows: str = ""


class AcrossRanks:
    """What ``across_ranks`` returns: a loss over every rank's rows, called with this rank's.

    A backend subclasses it with :meth:`collective_for` (its collective, and its checks of where
    it is called) and, if ``across_ranks`` takes one, the argument naming the ranks (:attr:`place`).
    """

    #: tells the framework's ``cached_step`` (distributed) to pass this rank's own representations
    #: rather than the gathered global batch
    gathers_itself = True
    #: the keyword argument of ``across_ranks`` naming the ranks (``"group"``, ``"axis_name"``),
    #: kept as the attribute of that name; ``None``: it takes none
    place: str | None = None
    #: its default, or :data:`REQUIRED`
    place_default: Any = REQUIRED

    def __init__(self, ops: LossOps, loss: Callable, loss_kwargs: dict, where: Any = None):
        self.ops = ops
        self.loss = loss
        self.loss_kwargs = loss_kwargs
        if self.place is not None:
            setattr(self, self.place, where)

    def collective_for(self, x: Any, y: Any) -> Collective:
        """The collective of one call, from where it is called; raises if it cannot run there."""
        raise NotImplementedError(f"{type(self).__name__} must say which collective it uses")

    def __call__(self, x: Any, y: Any, **overrides: Any) -> Any:
        collective = self.collective_for(x, y)
        kwargs = {**self.loss_kwargs, **overrides}
        return _loss_forms.across(self.ops, self.loss.__name__, collective, x, y, **kwargs)

    def __repr__(self) -> str:
        place = "" if self.place is None else f", {self.place}={getattr(self, self.place)!r}"
        return f"across_ranks({self.loss.__name__}{place}, **{self.loss_kwargs!r})"


class LossFunctions(NamedTuple):
    """What :func:`bind` returns, in the order an adapter unpacks it."""

    info_nce: Callable
    clip_loss: Callable
    siglip_loss: Callable
    info_nce_dense: Callable
    clip_loss_dense: Callable
    siglip_loss_dense: Callable
    across_ranks: Callable


def bind(ops: LossOps, docs: LossDocs, across_type: type[AcrossRanks]) -> LossFunctions:
    """The seven public loss functions of a backend: ``ops`` underneath, ``docs`` filled in,
    ``across_type`` returned by ``across_ranks``."""

    def info_nce(q, p, *, temperature=DEFAULT_TEMPERATURE, similarity="dot", tile_size=None):
        return _loss_forms.info_nce(ops, q, p, temperature, similarity, tile_size)

    def clip_loss(x, y, *, logit_scale=DEFAULT_CLIP_SCALE, similarity="dot", tile_size=None):
        return _loss_forms.clip_loss(ops, x, y, logit_scale, similarity, tile_size)

    def siglip_loss(x, y, *, logit_scale=DEFAULT_SIGLIP_SCALE, logit_bias=DEFAULT_SIGLIP_BIAS,
                    similarity="dot", tile_size=None):
        return _loss_forms.siglip_loss(ops, x, y, logit_scale, logit_bias, similarity, tile_size)

    def info_nce_dense(q, p, *, temperature=DEFAULT_TEMPERATURE, similarity="dot"):
        return _loss_forms.info_nce_dense(ops, q, p, temperature, similarity)

    def clip_loss_dense(x, y, *, logit_scale=DEFAULT_CLIP_SCALE, similarity="dot"):
        return _loss_forms.clip_loss_dense(ops, x, y, logit_scale, similarity)

    def siglip_loss_dense(x, y, *, logit_scale=DEFAULT_SIGLIP_SCALE,
                          logit_bias=DEFAULT_SIGLIP_BIAS, similarity="dot"):
        return _loss_forms.siglip_loss_dense(ops, x, y, logit_scale, logit_bias, similarity)

    tiled = (info_nce, clip_loss, siglip_loss)
    place = across_type.place

    # The argument naming the ranks differs per backend (``group=None``, a required
    # ``axis_name``, none), so it is read from the keywords here and shown by __signature__.
    def across_ranks(loss, **loss_kwargs):
        where = None
        if place is not None:
            where = loss_kwargs.pop(place, across_type.place_default)
            if where is REQUIRED:
                raise TypeError(f"across_ranks() missing 1 required keyword-only argument: "
                                f"{place!r}")
        _loss_forms.check_across(loss, tiled, docs.module, loss_kwargs)
        return across_type(ops, loss, loss_kwargs, where)

    functions = LossFunctions(info_nce, clip_loss, siglip_loss, info_nce_dense, clip_loss_dense,
                              siglip_loss_dense, across_ranks)
    for function in functions:
        _publish(function, docs, across_type)
    return functions


def _publish(function: Callable, docs: LossDocs, across_type: type[AcrossRanks]) -> None:
    """Name, annotate and document ``function`` as the backend's own."""
    name = function.__name__
    function.__module__ = docs.module
    function.__qualname__ = name
    function.__doc__ = _docstring(name, docs)
    if name == "across_ranks":
        parameters = [inspect.Parameter("loss", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                        annotation=Callable)]
        if across_type.place is not None:
            parameters.append(inspect.Parameter(across_type.place, inspect.Parameter.KEYWORD_ONLY,
                                                default=across_type.place_default,
                                                annotation=Any))
        parameters.append(inspect.Parameter("loss_kwargs", inspect.Parameter.VAR_KEYWORD,
                                            annotation=Any))
        # inspect honours __signature__ on any callable; typeshed declares it on none
        function.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            parameters, return_annotation=across_type)
        return
    scalar = float | docs.array_type
    kinds = {"q": Any, "p": Any, "x": Any, "y": Any, "temperature": scalar,
             "logit_scale": scalar, "logit_bias": scalar, "similarity": str,
             "tile_size": int | None}
    function.__annotations__ = {parameter: kinds[parameter]
                                for parameter in inspect.signature(function).parameters}
    function.__annotations__["return"] = docs.array_type


# -- the docstrings, written once ------------------------------------------------------------------
_TILED = {
    "info_nce": """
        InfoNCE (multiple-negatives ranking) with in-batch and hard negatives, tiled.

        Query ``i`` is scored against every row of ``p``; its positive is row ``i * (k + 1)``,
        where ``p`` lays out ``k + 1`` rows per query (the positive, then ``k`` hard negatives).
        The loss is ``mean_i [logsumexp_j(s_ij / t) - s_i,pos / t]``: equal to
        :func:`info_nce_dense`, value and gradients, in ``O((B + tile)·d + tile²)`` memory.

        {gradients}

        Args:
            q: ``(B, d)`` query representations{rows}.
            p: ``(B * (k + 1), d)`` passage representations, ``k >= 0``.
            temperature: a float or a scalar {tensor} ({learnable} to learn it).
            similarity: ``"dot"`` or ``"cosine"`` (rows normalised first).
            tile_size: rows and columns per tile of logits (default 512, 4096 on a GPU); memory,
                never the result.

        Returns:
            The scalar loss.
        """,
    "clip_loss": """
        The symmetric CLIP loss, tiled: InfoNCE over the rows and over the columns, averaged.

        Logits are ``logit_scale * x @ y.T``; row ``i`` of ``x`` pairs with row ``i`` of ``y``. As
        in CLIP, learn the scale as {log_scale} (pass the result here).

        {gradients}

        Args:
            x: ``(B, d)`` representations (images){rows}.
            y: ``(B, d)`` representations (texts).
            logit_scale: a float or a scalar {tensor} (default ``1 / 0.07``).
            similarity: ``"dot"`` (CLIP normalises in the model) or ``"cosine"``.
            tile_size: rows and columns per tile of logits (default 512, 4096 on a GPU).

        Returns:
            The scalar loss, equal to :func:`clip_loss_dense`.
        """,
    "siglip_loss": """
        The SigLIP sigmoid loss, tiled: every pair is a binary problem, positives on the diagonal.

        ``-(1/B) sum_ij log sigmoid(label_ij * (logit_scale * x_i . y_j + logit_bias))`` with
        ``label = +1`` on the diagonal and ``-1`` elsewhere (SigLIP's ``t`` and ``b``).

        {gradients}

        Args:
            x: ``(B, d)`` representations (images){rows}.
            y: ``(B, d)`` representations (texts).
            logit_scale: SigLIP's temperature ``t`` (a multiplier; default 10), a float or a scalar
                {tensor} ({learnable} to learn it).
            logit_bias: SigLIP's bias ``b`` (default -10), likewise.
            similarity: ``"dot"`` or ``"cosine"``.
            tile_size: rows and columns per tile of logits (default 512, 4096 on a GPU).

        Returns:
            The scalar loss, equal to :func:`siglip_loss_dense`.
        """,
}

_DENSE = """
    :func:`{tiled}` with the whole ``{matrix}`` logit matrix: plain {autodiff}, the reference.
    """

_ACROSS = """
    ``loss`` over the global batch of {ranks}, each {unit} computing its own rows' share.

    The returned callable{where} takes *this {unit}'s* rows, ``(x_local, y_local)``, and returns
    the loss of the global batch -- every {unit}'s rows concatenated in {unit} order -- the same
    value on every {unit}. Its gradient with respect to ``x_local`` and ``y_local`` is that of the
    global loss. Each {unit} scores only its own rows against every gathered column, so the work
    and the memory of the loss are divided among {unit}s; per call it {communicates}. Every {unit}
    must call it, and run its gradient, at the same point: it communicates in both.

    {specifics}

    Args:
        loss: :func:`info_nce`, :func:`clip_loss` or :func:`siglip_loss`.
    {place_doc}    **loss_kwargs: the loss's keyword arguments (``temperature``, ``logit_scale``,
            ``logit_bias``, ``similarity``, ``tile_size``), the same on every {unit}; more, or
            overrides, may be given per call: ``loss_fn(x_local, y_local, temperature=t)``.

    Returns:
        A callable ``(x_local, y_local, **more_kwargs) -> loss`` with ``gathers_itself = True``.
    """


def _piece(text: str) -> str:
    return textwrap.dedent(text).strip()


def _docstring(name: str, docs: LossDocs) -> str:
    # a piece written on several lines is dedented; a one-line piece may begin with a space or a
    # comma, which it keeps
    pieces = {key: _piece(value) if "\n" in value else value
              for key, value in vars(docs).items() if isinstance(value, str)}
    if name == "across_ranks":
        place_doc = _piece(docs.place_doc)
        # an entry of the template's Args, which are indented by 4
        pieces["place_doc"] = textwrap.indent(place_doc, "    ") + "\n" if place_doc else ""
        return _refill(_piece(_ACROSS).format(**pieces)) + "\n"
    if name.endswith("_dense"):
        tiled = name[:-len("_dense")]
        matrix = "B x B(k+1)" if tiled == "info_nce" else "B x B"
        text = _piece(_DENSE).format(tiled=tiled, matrix=matrix, **pieces)
    else:
        text = _piece(_TILED[name]).format(**pieces)
    return _refill(text) + "\n\n" + _piece(docs.examples[name]) + "\n"


def _refill(text: str) -> str:
    """``text`` with each paragraph of prose filled to the width of the source: a backend's piece
    makes a line longer or shorter. Indented blocks (Args, Returns) are left as written, and no
    line breaks inside a ````literal````."""
    paragraphs = text.split("\n\n")
    for index, paragraph in enumerate(paragraphs):
        lines = paragraph.splitlines()
        if lines and not any(line.startswith((" ", ">>>")) for line in lines):
            joined = re.sub(r"``.*?``", lambda span: span[0].replace(" ", _KEEP), " ".join(lines))
            filled = textwrap.fill(joined, width=96, break_long_words=False,
                                   break_on_hyphens=False)
            paragraphs[index] = filled.replace(_KEEP, " ")
    return "\n\n".join(paragraphs)


_KEEP = "\N{NO-BREAK SPACE}"  # a space textwrap does not break at
