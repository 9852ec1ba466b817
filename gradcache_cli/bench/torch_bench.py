"""The PyTorch side of ``gradcache bench``: the encoder, the two steps, and their measurement jobs.

The cached step is ``gradcache_torch.cached_step``; the full-batch step is the plain
``info_nce(model(q), model(p)).backward()`` it replaces. Both use the library's tiled InfoNCE
(``gradcache_torch.losses.info_nce``); ``cached_dense`` is the cached step with the dense
``B x B`` loss, for contrast. Both leave the parameter gradients in
``.grad``. Imported only in a child process (:mod:`gradcache_cli.bench.child`), since it imports
torch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from gradcache_cli.bench.model import SCALE, TIMED, init_weights, time_interleaved, token_batch
from gradcache_cli.memory import mentions_memory, rss_growth
from gradcache_torch import cached_step
from gradcache_torch import losses as tiled_losses


class Encoder(torch.nn.Module):
    """Embedding, residual position-wise MLP blocks, mean pooling, projection (see _bench_model)."""

    def __init__(self, model: dict):
        super().__init__()
        weights = {name: torch.nn.Parameter(torch.from_numpy(value))
                   for name, value in init_weights(model).items()}
        self.weights = torch.nn.ParameterDict(weights)
        self.blocks = model["blocks"]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        w = self.weights
        x = F.embedding(ids, w["embed"])
        for i in range(self.blocks):
            x = x + F.gelu(x @ w[f"w1_{i}"] + w[f"b1_{i}"]) @ w[f"w2_{i}"] + w[f"b2_{i}"]
        return x.mean(dim=1) @ w["w_out"] + w["b_out"]


def info_nce(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    scores = SCALE * F.normalize(q, dim=1) @ F.normalize(p, dim=1).T
    return F.cross_entropy(scores, torch.arange(len(q)))

def info_nce_tiled(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The same InfoNCE by the library's tiled loss: no ``B x B`` score matrix is ever held."""
    return tiled_losses.info_nce(q, p, temperature=1 / SCALE, similarity="cosine")


def _steps(model: dict, chunk: int) -> tuple[Encoder, dict]:
    torch.manual_seed(0)
    encoder = Encoder(model)

    def cached(q: torch.Tensor, p: torch.Tensor) -> None:
        cached_step(encoder, (q, p), info_nce_tiled, chunk_size=chunk)

    def cached_dense(q: torch.Tensor, p: torch.Tensor) -> None:
        cached_step(encoder, (q, p), info_nce, chunk_size=chunk)

    def full(q: torch.Tensor, p: torch.Tensor) -> None:
        info_nce_tiled(encoder(q), encoder(p)).backward()

    return encoder, {"cached": cached, "cached_dense": cached_dense, "full": full}


def _batch(model: dict, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    queries, passages = token_batch(model, rows)
    return torch.from_numpy(queries), torch.from_numpy(passages)


def _threads(payload: dict) -> None:
    if payload.get("threads"):
        torch.set_num_threads(int(payload["threads"]))


def memory(payload: dict) -> dict:
    """One step of ``payload["kind"]`` at ``payload["batch"]`` rows: its peak RSS growth."""
    _threads(payload)
    model, chunk, rows = payload["model"], payload["chunk"], payload["batch"]
    encoder, steps = _steps(model, chunk)
    step = steps[payload["kind"]]
    q, p = _batch(model, rows)
    small = _batch(model, min(chunk, rows))

    def warm_up() -> None:
        # One step on a chunk's rows: pages in the autograd and kernel code, starts the threads.
        step(*small)
        encoder.zero_grad(set_to_none=True)  # so that the measured step allocates its gradients

    def is_oom(error: BaseException) -> bool:
        return isinstance(error, RuntimeError) and mentions_memory(error)

    return rss_growth(lambda: step(q, p), warm_up, payload["budget"], is_oom)


def time(payload: dict) -> dict:
    """Median step times of both steps at each batch in ``payload["batches"]``, interleaved."""
    _threads(payload)
    model, chunk = payload["model"], payload["chunk"]
    rows_out = []
    for rows in payload["batches"]:
        encoder, steps = _steps(model, chunk)
        q, p = _batch(model, rows)

        def run(step: Any, encoder: Any = encoder, q: Any = q, p: Any = p) -> Any:
            def once() -> None:
                encoder.zero_grad(set_to_none=True)
                step(q, p)
            return once

        medians = time_interleaved({name: run(steps[name]) for name in TIMED},
                                   payload["repeats"])
        rows_out.append({"batch": rows, "chunk": chunk, **medians})
    return {"version": torch.__version__.split("+")[0], "threads": torch.get_num_threads(),
            "rows": rows_out}
