"""The demo's story, told once for every backend: data, before, train, after, memory, batch sizes.

A backend contributes one module (``torch_demo``, ``jax_demo``, ``tf_demo``) with four
functions -- ``setup(args)``, ``prepare(args, pairs)``, ``new_model(args, seed=...)``,
``step_memory(args, mode)`` -- and a model object with ``description``, ``embed(features)`` and
``step(features, rows, chunk_size)`` (``chunk_size=None`` for a plain, uncached step). Everything
else lives here: which pairs are used, the batch order, the progress bar, the metrics, the timing
and every printed line, so the backends print the same report. No framework is imported here.
"""

from __future__ import annotations

import argparse
import importlib
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol, TextIO

import numpy as np

from gradcache_cli.demo import data, metrics, options


class DemoModel(Protocol):
    """What a backend's model offers the runner."""

    description: str

    def embed(self, features: Any) -> tuple[np.ndarray, np.ndarray]:
        """Normalised (query, code) vectors of every pair in ``features``, as numpy arrays."""

    def step(self, features: Any, rows: np.ndarray, chunk_size: int | None) -> float:
        """One optimiser step on ``rows`` of ``features``: cached with ``chunk_size``, else plain."""


class RunResult(NamedTuple):
    """One training run: its batch, how it stepped, the quality it reached and the time it took."""

    batch: int
    chunk: int | None
    steps: int
    quality: metrics.Quality
    seconds: float


def select_pairs(args: argparse.Namespace) -> data.Dataset:
    """The train and test pairs of this run: the cached data set, cut by ``--max-train/--max-test``.

    Cuts take a seeded random sample (not the first rows, which would be a few modules only).
    """
    cache = None if args.cache_dir is None else args.cache_dir
    dataset = data.load_dataset(cache, test_fraction=args.test_fraction, seed=args.seed,
                                rebuild=getattr(args, "rebuild_data", False))
    train, test = dataset.train, dataset.test
    if args.max_train and args.max_train < len(train):
        train = sorted(random.Random(args.seed).sample(train, args.max_train), key=train.index)
    if args.max_test and args.max_test < len(test):
        test = sorted(random.Random(args.seed + 1).sample(test, args.max_test), key=test.index)
    return data.Dataset(train, test, dataset.source)


def batches(n: int, batch: int, epochs: int, seed: int) -> list[np.ndarray]:
    """Row indices of every step: each epoch a fresh permutation cut into batches (last one short).

    >>> [b.tolist() for b in batches(5, 2, 1, seed=0)]  # the last row joins the batch before it
    [[2, 4], [3, 0, 1]]
    """
    rng = np.random.default_rng(seed)
    out: list[np.ndarray] = []
    for _ in range(epochs):
        order = rng.permutation(n)
        # A last batch of one row has no negative, and its loss would be zero: fold it in.
        cuts = list(range(0, n, batch))
        if len(cuts) > 1 and n - cuts[-1] < 2:
            cuts.pop()
        bounds = cuts[1:] + [n]
        out.extend(order[start:stop] for start, stop in zip(cuts, bounds, strict=True))
    return out


def _progress(total: int, desc: str, enabled: bool) -> Any:
    """A tqdm bar on stderr, or a stand-in with the same two methods when tqdm is missing or off."""
    if enabled:
        try:
            from tqdm.auto import tqdm
            return tqdm(total=total, desc=desc, unit="step", file=sys.stderr, leave=True,
                        dynamic_ncols=True)
        except ImportError:
            pass

    class _Silent:
        def update(self, n: int = 1) -> None: ...
        def set_postfix_str(self, text: str, refresh: bool = True) -> None: ...
        def close(self) -> None: ...

    return _Silent()


def evaluate(model: DemoModel, features: Any) -> metrics.Quality:
    """Retrieval quality of ``model`` over the whole pool of ``features``."""
    queries, code = model.embed(features)
    return metrics.retrieval_quality(queries, code)


def train(model: DemoModel, features: Any, n: int, *, batch: int, chunk: int | None, epochs: int,
          seed: int, label: str, progress: bool) -> tuple[int, float]:
    """Trains ``model`` for ``epochs`` passes; returns (steps, seconds)."""
    plan = batches(n, batch, epochs, seed)
    bar = _progress(len(plan), label, progress)
    start = time.perf_counter()
    try:
        for rows in plan:
            loss = model.step(features, rows, chunk)
            if not math.isfinite(loss):
                raise RuntimeError(f"the loss became {loss} during '{label}'; try a smaller --lr")
            bar.set_postfix_str(f"loss {loss:.3f}", refresh=False)
            bar.update(1)
    finally:
        bar.close()
    return len(plan), time.perf_counter() - start


def _seconds(value: float) -> str:
    return f"{value:.0f} s" if value >= 10 else f"{value:.1f} s"


def run(args: argparse.Namespace, *, out: TextIO | None = None,
        load_backend: Callable[[str], Any] = importlib.import_module) -> dict:
    """Runs the whole demo for ``args`` (checked by :func:`options.finalize`); prints the report.

    Returns the figures it printed (qualities, memory, timings), for tests and other callers.
    """
    out = out if out is not None else sys.stdout

    def say(text: str = "") -> None:
        print(text, file=out, flush=True)

    started = time.perf_counter()
    backend = load_backend(options.check_backend(args.backend))
    framework = backend.setup(args)
    dataset = select_pairs(args)
    train_pairs, test_pairs = dataset.train, dataset.test
    n_train = len(train_pairs)
    batch = min(args.batch_size, n_train)
    chunk = min(args.chunk_size, batch)
    modules_train = len({pair.module for pair in train_pairs})
    modules_test = len({pair.module for pair in test_pairs})

    say(f"gradcache demo: code search on the Python {sys.version.split()[0]} standard library "
        f"({args.backend}: {framework})")
    say(f"data    {n_train} train pairs from {modules_train} modules, {len(test_pairs)} held-out "
        f"test pairs from {modules_test} other modules (split by module, seed {args.seed})")
    say(f"        query = a function's docstring, answer = its source without the docstring; "
        f"{dataset.source}")
    if batch < args.batch_size:
        say(f"        (--batch-size {args.batch_size} is more than the {n_train} training pairs: "
            f"batch {batch})")

    train_features = backend.prepare(args, train_pairs)
    test_features = backend.prepare(args, test_pairs)
    big_lr = options.scaled_lr(args.lr, batch)
    model = backend.new_model(args, seed=args.seed, lr=big_lr)
    say(f"model   {model.description}")
    say(f"        loss: InfoNCE with in-batch negatives (each query against every answer of its "
        f"batch), scale {getattr(model, 'scale', 20):g}")
    say()

    pool = f"{len(test_pairs)} held-out pairs, each query ranked against all {len(test_pairs)} answers"
    before = evaluate(model, test_features)
    say(f"before training  {before}   ({pool})")
    say(f"training at batch {batch} with chunk {chunk} (gradcache: {math.ceil(batch / chunk)} "
        f"chunks per input per step), {args.epochs} epochs, lr {big_lr:.3g}")
    steps, seconds = train(model, train_features, n_train, batch=batch, chunk=chunk,
                           epochs=args.epochs, seed=args.seed, label=f"batch {batch} cached",
                           progress=not args.no_progress)
    after = evaluate(model, test_features)
    say(f"after training   {after}   ({steps} steps, {_seconds(seconds)})")
    big = RunResult(batch, chunk, steps, after, seconds)
    figures: dict[str, Any] = {"before": before, "after": after, "large": big,
                               "n_train": n_train, "n_test": len(test_pairs)}

    if args.memory != "off":
        say()
        figures["memory"] = _report_memory(say, backend, args, batch, chunk)

    if not args.no_compare:
        small_batch = min(args.small_batch, n_train)
        small_lr = options.scaled_lr(args.lr, small_batch)
        say()
        say(f"why the batch matters: the same {args.epochs} epochs from the same initial weights, "
            f"at batch {small_batch} (plain steps) and at batch {batch} (cached), learning rates "
            f"{small_lr:.3g} and {big_lr:.3g} (square-root rule)")
        small_model = backend.new_model(args, seed=args.seed, lr=small_lr)
        small_steps, small_seconds = train(
            small_model, train_features, n_train, batch=small_batch, chunk=None,
            epochs=args.epochs, seed=args.seed, label=f"batch {small_batch} plain",
            progress=not args.no_progress)
        small = RunResult(small_batch, None, small_steps, evaluate(small_model, test_features),
                          small_seconds)
        figures["small"] = small
        rows = []
        for result in (small, big):
            how = "plain" if result.chunk is None else f"cached, chunk {result.chunk}"
            rows.append([result.batch, result.batch - 1, how, result.steps,
                         f"{result.quality.mrr10:.3f}", f"{result.quality.recall1:.3f}",
                         _seconds(result.seconds)])
        say(metrics.table(rows, ["batch", "negatives/query", "step", "steps", "MRR@10",
                                 "recall@1", "time"]))
    say()
    total = time.perf_counter() - started
    figures["seconds"] = total
    say(f"done in {_seconds(total)}")
    return figures


def _report_memory(say: Callable[[str], None], backend: Any, args: argparse.Namespace,
                   batch: int, chunk: int) -> dict:
    """Prints the cached step's peak memory beside a full-batch step's, with how it was obtained."""
    how = {"measure": "measured: peak resident memory growth during one step, each in a fresh "
                      "process",
           "compute": "computed from the sizes of what the step holds"}[args.memory]
    # A backend that obtains the figure another way (JAX: XLA's compiled account) names it itself.
    how = getattr(backend, "memory_how", lambda mode: None)(args.memory) or how
    say(f"memory of one step at batch {batch} ({how})")
    cached, full, parts = backend.step_memory(args, args.memory)
    size = metrics.format_bytes

    def show(result: Any) -> str:
        if result.bytes is None:
            if result.limit:
                return f"did not fit in {size(result.limit)} ({result.note})"
            return f"unknown ({result.note})"
        return size(result.bytes)

    rows = [[f"cached step, chunk {chunk}", show(cached), size(parts.encoder_cached)],
            ["full-batch step", show(full), size(parts.encoder_full)]]
    for line in metrics.table(rows, ["", "peak", "of which encoder activations (computed)"]
                              ).splitlines():
        say(f"  {line}")
    if cached.bytes and full.bytes:
        say(f"  the full-batch step needs {full.bytes / cached.bytes:.1f}x the memory of the "
            f"cached step for the same gradients; caching cuts the encoder's share "
            f"{parts.encoder_full / max(parts.encoder_cached, 1):.0f}x (batch / chunk).")
    hint = "; the encoder's share grows with the model (see --model minilm)" \
        if args.model == "bag" else ""
    say(f"  Both steps also hold the {batch}x{batch} loss with the representations "
        f"({size(parts.loss)}) and the parameter gradients ({size(parts.gradients)}), "
        f"computed{hint}.")
    return {"cached": cached, "full": full, "breakdown": parts}


def main_for_tests(argv: Sequence[str]) -> dict:
    """Parses ``argv`` as demo options and runs the demo (a helper for tests)."""
    return run(options.parse(argv))
