"""sentence-transformers: gradient caching for any loss built on sentence embeddings.

:class:`GradCacheLoss` wraps a sentence-transformers loss module -- ``MultipleNegativesRankingLoss``,
``MultipleNegativesSymmetricRankingLoss``, ``GISTEmbedLoss``, ``MatryoshkaLoss`` around one of
them, or your own -- and computes it with :func:`gradcache_torch.cached_loss`: the batch's columns are
encoded chunk by chunk (padding trimmed per chunk), the wrapped loss runs once on the whole batch's
embeddings, and ``.backward()`` (the ``SentenceTransformerTrainer``'s, with its loss scaling and
gradient accumulation) re-encodes each chunk with a graph. The gradients are those of the wrapped
loss on the full batch; memory holds one chunk's activations.

How the wrapped loss gets the cached embeddings: while it runs, the model's ``forward`` is swapped
for one that returns, for each column the loss asks about, that column's precomputed embedding
(``{"sentence_embedding": ...}``). So the loss's own ``forward`` runs unchanged -- whatever it
does with the embeddings (similarity matrices, a guide model, Matryoshka's truncations, hardness
weighting) -- and no loss needs a special method. A loss qualifies if it embeds each input column at
most once, through ``model(features)``, and uses only ``"sentence_embedding"`` from the output;
anything else (token embeddings, a second draw of the same column) raises
:class:`gradcache.GradCacheError`. Other sentence-transformers models the loss holds (the guide of
``GISTEmbedLoss``) run in chunks of ``chunk_size`` rows too when they need no gradient.

sentence-transformers is imported only when a :class:`GradCacheLoss` runs, so this module (and
``gradcache_torch``) imports without it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

from gradcache import GradCacheError

__all__ = ["GradCacheLoss"]

_MISSING = object()
# what a SentenceTransformer's modules write into the feature dict they are given
_OUTPUT_KEYS = frozenset({"token_embeddings", "sentence_embedding", "all_layer_embeddings",
                          "token_weights_sum"})


# where a refused loss's user reads what GradCacheLoss needs of a loss
_SEE = " (docs/sentence-transformers.md: what a loss must do to qualify)"


def _sentence_embedding(output: Any) -> torch.Tensor:
    if not isinstance(output, Mapping) or "sentence_embedding" not in output:
        raise GradCacheError(
            f"the model returned {type(output).__name__} without a 'sentence_embedding': GradCacheLoss "
            "needs a SentenceTransformer (or a module whose forward returns a dict holding one)")
    return output["sentence_embedding"]


def _rows(features: Mapping) -> int | None:
    """The batch size of a feature dict whose every tensor has its rows first, else None."""
    sizes = {value.shape[0] for value in features.values()
             if isinstance(value, torch.Tensor) and value.dim() > 0}
    mask = features.get("attention_mask")
    if len(sizes) != 1 or not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return None   # flattened (cu_seq_lens) or image batches: run as they are
    return sizes.pop()


class GradCacheLoss(torch.nn.Module):
    """A sentence-transformers loss computed with gradient caching; gradients equal the loss's own.

    Use it where the loss goes: ``SentenceTransformerTrainer(model, args, train_dataset,
    loss=GradCacheLoss(MultipleNegativesRankingLoss(model), chunk_size=32))``. The batch size is
    then limited by time, not memory: ``per_device_train_batch_size`` can grow while ``chunk_size``
    bounds the activations held at once. It works with the trainer's gradient accumulation, fp16
    loss scaling and evaluation loop (under ``torch.no_grad`` the loss is computed without any
    gradient), because :func:`gradcache_torch.cached_loss` returns a loss whose ``.backward()``
    runs the second pass.

    Wrap the outermost loss: ``GradCacheLoss(MatryoshkaLoss(model, MultipleNegativesRankingLoss(model),
    [384, 128]))``, not the other way round (MatryoshkaLoss swaps the model's forward itself).

    Args:
        loss: a sentence-transformers loss module holding the model as ``loss.model`` and called as
            ``loss(sentence_features, labels)``.
        chunk_size: rows per chunk in both encoding passes (and for the guide models). It bounds
            memory; it never changes the gradients.
        pad_trim: cut each chunk to its longest row (on by default: a short chunk does not pay for
            the batch's longest text).
        sort_by_length: form chunks from length-sorted rows so that ``pad_trim`` removes more
            padding (faster on text of mixed lengths); dropout masks then fall on other rows (an
            equally valid draw).
        **options: any other keyword of :func:`gradcache_torch.cached_loss` (``check_finite``,
            ``check_determinism``, ``progress``, ``distributed``, ...).

    >>> from sentence_transformers import SentenceTransformer            # doctest: +SKIP
    >>> from sentence_transformers.sentence_transformer.losses import (  # doctest: +SKIP
    ...     MultipleNegativesRankingLoss)
    >>> from gradcache_torch.sentence_transformers import GradCacheLoss  # doctest: +SKIP
    >>> model = SentenceTransformer("sentence-transformers/all-MiniLM-L6-v2")  # doctest: +SKIP
    >>> loss = GradCacheLoss(MultipleNegativesRankingLoss(model), chunk_size=32)  # doctest: +SKIP
    >>> features = [model.tokenize(["a query"] * 64), model.tokenize(["a passage"] * 64)]  # doctest: +SKIP
    >>> loss(features, None).backward()   # the gradient of MNRL on all 64 pairs  # doctest: +SKIP
    """

    def __init__(self, loss: torch.nn.Module, chunk_size: int = 32, *, pad_trim: bool = True,
                 sort_by_length: bool = False, **options: Any):
        super().__init__()
        if not isinstance(loss, torch.nn.Module) or not hasattr(loss, "model"):
            raise GradCacheError(
                f"GradCacheLoss wraps a sentence-transformers loss module that holds the model as "
                f"`.model` (e.g. MultipleNegativesRankingLoss(model)); got {type(loss).__name__}")
        if getattr(loss, "uses_gradient_cache", False):
            raise GradCacheError(
                f"{type(loss).__name__} caches gradients itself; wrap its uncached counterpart "
                f"(e.g. MultipleNegativesRankingLoss instead of CachedMultipleNegativesRankingLoss)")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise GradCacheError(f"chunk_size must be a positive int, got {chunk_size!r}")
        self.loss = loss
        self.chunk_size = chunk_size
        self.options = dict(options, pad_trim=pad_trim, sort_by_length=sort_by_length)

    @property
    def model(self) -> torch.nn.Module:
        """The wrapped loss's model (the trainer swaps in its wrapped model there)."""
        model = self.loss.model
        assert isinstance(model, torch.nn.Module)
        return model

    def forward(self, sentence_features: Iterable[dict[str, torch.Tensor]],
                labels: torch.Tensor | None = None) -> torch.Tensor:
        from gradcache_torch import cached_loss

        features = list(sentence_features)
        model = self.model
        if _swapped(model):
            raise GradCacheError(
                "the model's forward is already swapped (by a loss decorator such as MatryoshkaLoss "
                "around GradCacheLoss?); make GradCacheLoss the outermost loss: "
                "GradCacheLoss(MatryoshkaLoss(model, inner_loss, dims))" + _SEE)
        # the encoder gets its own shallow copies without the outputs of an earlier forward (a
        # SentenceTransformer writes them into the dict it is given): inputs only, cut per chunk
        columns = [{key: value for key, value in column.items() if key not in _OUTPUT_KEYS}
                   for column in features]

        def loss_fn(*embeddings: torch.Tensor) -> torch.Tensor:
            with self._serving(model, features, embeddings):
                value = self.loss(features, labels)
            if isinstance(value, Mapping):   # a loss with named components: their sum is the loss
                value = torch.stack(list(value.values())).sum()
            return value

        return cached_loss(model, columns, loss_fn, chunk_size=self.chunk_size,
                           get_rep=_sentence_embedding, **self.options)

    # -- the wrapped loss's view of the model ------------------------------------------------------
    @contextlib.contextmanager
    def _serving(self, model: torch.nn.Module, features: list[dict],
                 embeddings: tuple[torch.Tensor, ...]) -> Iterator[None]:
        """While the wrapped loss runs: ``model(column)`` returns the column's cached embedding,
        other sentence-transformers models held by the loss run in chunks, columns are not merged."""
        by_dict = {id(column): index for index, column in enumerate(features)}
        by_tensor = {id(value): index for index, column in enumerate(features)
                     for value in column.values() if isinstance(value, torch.Tensor)}
        served: set[int] = set()

        def forward(input: dict, **kwargs: Any) -> dict:
            if kwargs:
                raise GradCacheError(
                    f"the wrapped loss called the model with keyword arguments {sorted(kwargs)}; "
                    "GradCacheLoss encodes each column as model(features) and cannot replay others"
                    + _SEE)
            index = by_dict.get(id(input))
            if index is None and isinstance(input, Mapping):
                found = {by_tensor.get(id(value)) for value in input.values()
                         if isinstance(value, torch.Tensor)}
                index = found.pop() if len(found) == 1 else None
            if index is None:
                raise GradCacheError(
                    "the wrapped loss called the model on inputs that are not one of the batch's "
                    "columns (re-tokenized or merged features?); GradCacheLoss serves losses that "
                    "embed each column as model(features)" + _SEE)
            if index in served:
                raise GradCacheError(
                    f"the wrapped loss embeds column {index} twice; with dropout the two draws "
                    "differ, which a cached embedding cannot reproduce. GradCacheLoss serves losses "
                    "that embed each column once" + _SEE)
            served.add(index)
            return {**input, "sentence_embedding": embeddings[index]}

        with contextlib.ExitStack() as stack:
            stack.enter_context(_swapped_forward(model, forward))
            trained = set(map(id, model.modules()))
            for other in self.loss.modules():
                if id(other) not in trained and _is_sentence_model(other):
                    stack.enter_context(_swapped_forward(other, _chunked(other, self.chunk_size)))
            stack.enter_context(_columns_not_merged())
            yield

    def get_config_dict(self) -> dict[str, Any]:
        config = {"loss": type(self.loss).__name__, "chunk_size": self.chunk_size,
                  **{key: value for key, value in self.options.items()
                     if isinstance(value, (bool, int, float, str))}}
        inner = getattr(self.loss, "get_config_dict", None)
        return {**(inner() if callable(inner) else {}), **config}

    @property
    def citation(self) -> str:
        return """
@inproceedings{gao2021scaling,
    title={Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup},
    author={Gao, Luyu and Zhang, Yunyi and Han, Jiawei and Callan, Jamie},
    booktitle={Proceedings of the 6th Workshop on Representation Learning for NLP},
    year={2021},
}
"""


@contextlib.contextmanager
def _swapped_forward(module: torch.nn.Module, forward: Any) -> Iterator[None]:
    """``module.forward`` is ``forward`` for the block, whatever happens inside."""
    saved = vars(module).get("forward", _MISSING)
    module.forward = forward
    try:
        yield
    finally:
        if saved is _MISSING:
            del module.forward
        else:
            module.forward = saved


def _swapped(module: torch.nn.Module) -> bool:
    """Whether ``module.forward`` is something other than its class's (a loss decorator's)."""
    forward = vars(module).get("forward")
    return forward is not None and getattr(forward, "__func__", None) is not type(module).forward


def _is_sentence_model(module: torch.nn.Module) -> bool:
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:  # pragma: no cover - the wrapped loss comes from sentence-transformers
        return False
    return isinstance(module, SentenceTransformer)


def _chunked(module: torch.nn.Module, chunk_size: int) -> Any:
    """``module.forward`` run in chunks of ``chunk_size`` rows (padding trimmed per chunk) when
    nothing needs its gradient (a guide model under ``torch.no_grad``), as it is otherwise."""
    from gradcache_torch import trim_padding

    original = module.forward   # taken before it is swapped

    def forward(input: dict, **kwargs: Any) -> Any:
        rows = _rows(input) if isinstance(input, Mapping) else None
        needs_grad = torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters())
        if rows is None or rows <= chunk_size or needs_grad:
            return original(input, **kwargs)
        parts = []
        for start in range(0, rows, chunk_size):
            chunk = {key: value[start:start + chunk_size] if isinstance(value, torch.Tensor)
                     and value.dim() > 0 else value for key, value in input.items()}
            with contextlib.suppress(GradCacheError):   # a per-token leaf it cannot tell: untrimmed
                chunk = trim_padding(chunk)
            parts.append(_sentence_embedding(original(chunk, **kwargs)))
        return {**input, "sentence_embedding": torch.cat(parts)}

    return forward


@contextlib.contextmanager
def _columns_not_merged() -> Iterator[None]:
    """sentence-transformers >= 6 may embed like-shaped columns in one merged forward, on a new
    dict; GradCacheLoss serves each column by itself, so merging is turned off while it serves."""
    try:
        from sentence_transformers.base.losses.merged_forward import column_merging_disabled
    except ImportError:   # older versions embed each column by itself
        yield
        return
    with column_merging_disabled():
        yield
