"""What every backend of ``gradcache bench`` shares: the encoder's shape and weights, the data, the
memory sweep and the interleaved timing loop.

The encoder is the same function in torch, JAX and TensorFlow, with the same initial weights (drawn
here with numpy): token embeddings, ``blocks`` residual position-wise MLP blocks (``dim -> hidden ->
dim``, GELU), mean pooling over the sequence and a linear projection. It is a text encoder whose
activations, like a transformer's, grow with the sequence length and dwarf its representations --
the regime gradient caching is for -- while costing little compute per byte, so that a sweep up
to a few hundred MiB runs in seconds on a CPU. No dropout: random masks change nothing measured
here. The loss is InfoNCE with in-batch negatives over normalised vectors (cosine times 20,
cross-entropy against the diagonal), as in the demo: the cached and full-batch steps compute it
with the library's tiled loss (``gradcache_<backend>.losses.info_nce``, which never holds the
``B x B`` scores), so that the cached step's memory stays flat as the batch grows; the
``cached_dense`` step, the same cached step with the dense loss, shows the difference.

Numpy is imported inside functions, so that importing this module (the parent does, to plan the
sweep) costs nothing.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

SCALE = 20.0  # cosine similarity times 20: sentence-transformers' MultipleNegativesRankingLoss
# The steps every backend defines: the cached step (tiled loss), the cached step with the dense
# loss (for contrast, in memory only), the full-batch step (tiled loss). Timed: the first and last.
KINDS = ("cached", "cached_dense", "full")
TIMED = ("cached", "full")

# The default model: about 128 KiB of activations per row and group (seq 64 x 512 floats).
DEFAULT = {"vocab": 4096, "seq": 64, "dim": 64, "hidden": 192, "blocks": 2, "out": 64}
# --quick: a tiny model, for tests and a first look.
QUICK = {"vocab": 512, "seq": 16, "dim": 32, "hidden": 64, "blocks": 1, "out": 32}


def describe(model: Mapping[str, int]) -> str:
    """One line naming the encoder's shape."""
    return (f"token ids (seq {model['seq']}, vocab {model['vocab']}) -> embedding {model['dim']} -> "
            f"{model['blocks']} residual MLP block{'s' if model['blocks'] > 1 else ''} "
            f"({model['dim']}-{model['hidden']}-{model['dim']}, GELU) -> mean pool -> linear "
            f"{model['out']}; tiled InfoNCE (gradcache's losses.info_nce) over 2 groups "
            f"(query, passage), float32")


def init_weights(model: Mapping[str, int], seed: int = 0) -> dict[str, Any]:
    """The encoder's initial weights as numpy float32 arrays (the same for every backend)."""
    import numpy as np

    rng = np.random.default_rng(seed)

    def normal(shape: tuple[int, ...], fan_in: int) -> Any:
        return rng.normal(scale=fan_in ** -0.5, size=shape).astype(np.float32)

    d, h = model["dim"], model["hidden"]
    weights = {"embed": normal((model["vocab"], d), d)}
    for index in range(model["blocks"]):
        weights[f"w1_{index}"] = normal((d, h), d)
        weights[f"b1_{index}"] = np.zeros(h, np.float32)
        weights[f"w2_{index}"] = normal((h, d), h)
        weights[f"b2_{index}"] = np.zeros(d, np.float32)
    weights["w_out"] = normal((d, model["out"]), d)
    weights["b_out"] = np.zeros(model["out"], np.float32)
    return weights


def token_batch(model: Mapping[str, int], rows: int, seed: int = 1) -> tuple[Any, Any]:
    """A batch of random token ids, ``(queries, passages)``, each ``rows x seq`` int32."""
    import numpy as np

    rng = np.random.default_rng(seed)

    def draw() -> Any:
        return rng.integers(0, model["vocab"], size=(rows, model["seq"]), dtype=np.int32)

    return draw(), draw()


def sweep(measure: Callable[[str, int], dict], *, chunk: int, max_batch: int,
          extra_doublings: int, progress: Callable[[str, int, dict], None] | None = None,
          contrast: Sequence[str] = ()) -> dict[str, dict[int, dict]]:
    """Peak memory of both steps over doubling batch sizes, from ``chunk`` up to ``max_batch``.

    ``measure(kind, batch)`` returns ``{"bytes": n | None, "fits": bool, ...}``. The full-batch
    step is measured until it no longer fits the budget; the cached step goes on for
    ``extra_doublings`` more batch sizes past that point, to show where it is heading (and stops
    early if it, too, stops fitting). Each kind in ``contrast`` (``"cached_dense"``) is measured
    at the cached step's batches until it stops fitting. Returns ``{"cached": {batch: result},
    "full": {...}, ...}``.
    """
    results: dict[str, dict[int, dict]] = {kind: {} for kind in ("cached", *contrast, "full")}
    open_ = dict.fromkeys(results, True)
    extra_left = extra_doublings
    batch = chunk
    while batch <= max_batch and (open_["full"] or (open_["cached"] and extra_left >= 0)):
        if not open_["full"]:
            extra_left -= 1
            if extra_left < 0:
                break
        for kind in ("full", "cached", *contrast):
            if not open_[kind]:
                continue
            result = measure(kind, batch)
            results[kind][batch] = result
            if progress:
                progress(kind, batch, result)
            if not result.get("fits"):
                open_[kind] = False
        if not open_["cached"]:
            break
        batch *= 2
    return results


def time_interleaved(steps: Mapping[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median wall time of each step (seconds), the steps run in turn ``repeats`` times.

    Each step must return only when its work is done. Two warm-up rounds first (compilation,
    tracing, thread pools); then the steps alternate, so that drift in the machine's load hits
    every step alike -- these machines are shared, and only a ratio measured this way means much.
    """
    return {name: clocks["wall"] for name, clocks in time_clocks(steps, repeats).items()}


def time_clocks(steps: Mapping[str, Callable[[], Any]], repeats: int, *,
                warm_ups: int = 2) -> dict[str, dict[str, float]]:
    """:func:`time_interleaved` with both clocks: ``{name: {"wall": s, "cpu": s}}``, medians.

    ``cpu`` is this process's CPU time (all its threads) during the step: on shared cores it
    does not count the time a neighbour held the core, so with one thread per framework it is
    the steadier figure; wall time beside it shows the waiting (and any extra threads).
    """
    for _ in range(warm_ups):
        for step in steps.values():
            step()
    seconds: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            wall, cpu = time.perf_counter(), time.process_time()
            step()
            seconds[name]["cpu"].append(time.process_time() - cpu)
            seconds[name]["wall"].append(time.perf_counter() - wall)
    return {name: {clock: statistics.median(values) for clock, values in clocks.items()}
            for name, clocks in seconds.items()}
