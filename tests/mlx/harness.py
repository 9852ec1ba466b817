"""The contract problem of :mod:`gradcache.testing.contract`, written in MLX.

The encoders and the loss live in one ``nn.Module`` (``Problem``), as an MLX user keeps a
two-tower model with its temperature; the references are ``nn.value_and_grad`` of that module.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

import gradcache_mlx
from gradcache.testing.contract import Fault, ProblemSpec, Result


def to_mlx(tree: Any) -> Any:
    """numpy to MLX, keeping the dtype (``mx.array`` alone makes float64 float32)."""
    if isinstance(tree, np.ndarray):
        return mx.array(tree, dtype=getattr(mx, tree.dtype.name))
    if isinstance(tree, dict):
        return {k: to_mlx(v) for k, v in tree.items()}
    if isinstance(tree, tuple):
        return tuple(to_mlx(v) for v in tree)
    return tree


class ContractEncoder(nn.Module):
    def __init__(self, weight: np.ndarray, bias: np.ndarray, spec: ProblemSpec):
        super().__init__()
        self.W, self.b = to_mlx(weight), to_mlx(bias)
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout else None
        self.nested_output = spec.nested_output

    def __call__(self, x: mx.array, extra: tuple | None = None) -> Any:
        if extra is not None:
            x = x + 0.5 * extra[0]
        if self.dropout is not None:
            x = self.dropout(x)
        h = mx.tanh(x @ self.W + self.b)
        return (h, {"sq": h * h}) if self.nested_output else h


class ContractLoss(nn.Module):
    def __init__(self, scale: np.ndarray, spec: ProblemSpec):
        super().__init__()
        self.scale = to_mlx(np.array(scale))
        if not spec.learnable_scale:
            self.freeze(keys=["scale"])
        self.nested = spec.nested_output

    def __call__(self, *reps: Any) -> mx.array:
        rows = [r[0] + 0.5 * r[1]["sq"] if self.nested else r for r in reps]
        scores = self.scale * rows[0] @ mx.concatenate(rows).T
        return mx.mean(mx.logsumexp(scores, axis=1) - mx.diagonal(scores))


class Problem(nn.Module):
    """Every encoder and the loss: the module whose trainable parameters are differentiated."""

    def __init__(self, spec: ProblemSpec):
        super().__init__()
        arrays = spec.arrays()
        self.encoders = [ContractEncoder(arrays["params"][f"enc{e}.W"],
                                         arrays["params"][f"enc{e}.b"], spec)
                         for e in range(spec.num_encoders)]
        self.loss = ContractLoss(arrays["scale"], spec)
        self._inputs = [to_mlx(x) for x in arrays["inputs"]]
        self.spec = spec

    def per_group(self) -> list:
        spec = self.spec
        return [self.encoders[0 if spec.shared_encoder else g]
                for g in range(len(spec.batch_sizes))]

    def objective(self, loss: mx.array) -> mx.array:
        """What the contract differentiates: ``upstream * loss`` plus the extra term."""
        total = self.spec.upstream * loss
        if self.spec.extra_term:
            total = total + 0.5 * mx.sum(self.encoders[0].b ** 2)
        return total

    def named(self, grads: dict) -> dict:
        out = {}
        for e, encoder_grads in enumerate(grads["encoders"]):
            out[f"enc{e}.W"] = np.array(encoder_grads["W"])
            out[f"enc{e}.b"] = np.array(encoder_grads["b"])
        if self.spec.learnable_scale:
            out["scale"] = np.array(grads["loss"]["scale"])
        return out

    def values(self) -> dict:
        return {f"enc{e}.{n}": np.array(getattr(encoder, n))
                for e, encoder in enumerate(self.encoders) for n in ("W", "b")}


def call(encoder: Any, x: Any) -> Any:
    return encoder(**x) if isinstance(x, dict) else encoder(x)


def take(x: Any, start: int, stop: int) -> Any:
    if isinstance(x, dict):
        return {k: take(v, start, stop) for k, v in x.items()}
    if isinstance(x, tuple):
        return tuple(take(v, start, stop) for v in x)
    return x[start:stop]


def cat_reps(parts: list) -> Any:
    if isinstance(parts[0], tuple):
        return (mx.concatenate([p[0] for p in parts]),
                {"sq": mx.concatenate([p[1]["sq"] for p in parts])})
    return mx.concatenate(parts)


class Counted(nn.Module):
    """An encoder that tells the fault of its every call, counting over every encoder."""

    def __init__(self, inner: nn.Module, calls: dict, fault: Fault):
        super().__init__()
        self.inner, self._calls, self._fault = inner, calls, fault

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self._calls["n"] += 1
        self._fault.encoder_called(self._calls["n"])
        return self.inner(*args, **kwargs)


class RowsKept(nn.Module):
    def __init__(self, inner: nn.Module, rows: int):
        super().__init__()
        self.inner, self._rows = inner, rows

    def __call__(self, x: mx.array) -> mx.array:
        return self.inner(x)[: self._rows]


class MLXHarness:
    name = "mlx"
    features = frozenset({"nested_input", "nested_output", "dropout", "float32", "learnable_scale",
                          "separate_encoders", "rng_state", "cached_loss"})

    def run(self, spec: ProblemSpec, mode: str) -> Result:
        problem = Problem(spec)
        encoders, inputs, loss_fn = problem.per_group(), problem._inputs, problem.loss
        chunks = list(spec.chunk_sizes)
        mx.random.seed(spec.seed)
        if mode == "cached":
            loss, grads = gradcache_mlx.cached_step(encoders, inputs, loss_fn, chunk_size=chunks,
                                                    model=problem)
        elif mode == "cached_loss":
            def objective() -> mx.array:
                loss = gradcache_mlx.cached_loss(encoders, inputs, loss_fn, chunk_size=chunks,
                                                 model=problem)
                return problem.objective(loss), loss
            (_, loss), grads = nn.value_and_grad(problem, objective)()
        elif mode in ("full", "chunked"):
            def objective() -> mx.array:
                if mode == "full":
                    reps = [call(e, x) for e, x in zip(encoders, inputs)]
                else:
                    reps = [cat_reps([call(e, take(x, s, min(s + c, b))) for s in range(0, b, c)])
                            for e, x, b, c in zip(encoders, inputs, spec.batch_sizes, chunks)]
                loss = loss_fn(*reps)
                return problem.objective(loss), loss
            (_, loss), grads = nn.value_and_grad(problem, objective)()
        else:
            raise ValueError(mode)
        return Result(float(loss.item()), problem.named(grads),
                      rng_after=np.array(mx.random.state[0]))

    def run_failing(self, spec: ProblemSpec, fault: Fault,
                    mode: str = "cached") -> tuple[dict, dict, BaseException | None]:
        # functional: the step returns its gradients, so what must be untouched is the model,
        # whose parameters each differentiated call replaces with traced copies for a while
        problem = Problem(spec)
        before = problem.values()
        held = [id(a) for _, a in _flat(problem)]
        calls = {"n": 0}
        wrapped = {id(e): Counted(e, calls, fault) for e in problem.encoders}
        encoders = [wrapped[id(e)] for e in problem.per_group()]
        chunks = list(spec.chunk_sizes)

        def loss(*reps: Any) -> mx.array:
            value = problem.loss(*reps)
            fault.loss_called()
            return value

        error: BaseException | None = None
        try:
            if mode == "cached_loss":
                nn.value_and_grad(problem, lambda: 0.5 * gradcache_mlx.cached_loss(
                    encoders, problem._inputs, loss, chunk_size=chunks, model=problem))()
            else:
                gradcache_mlx.cached_step(encoders, problem._inputs, loss,
                                          chunk_size=chunks, model=problem)
        except BaseException as raised:  # noqa: BLE001 - a KeyboardInterrupt is a fault too
            error = raised
        after = problem.values()
        if mode == "cached":   # nn.value_and_grad leaves its traced copies; cached_step does not
            after["array ids"] = [id(a) for _, a in _flat(problem)]
            before["array ids"] = held
        return before, after, error

    # raw objects for the error tests
    def step(self, encoders: Any, inputs: Any, loss_fn: Any, **options: Any) -> Any:
        given = encoders if isinstance(encoders, (list, tuple)) else [encoders]
        holder = nn.Module()
        holder.parts = list({id(e): e for e in given}.values())
        return gradcache_mlx.cached_step(encoders, inputs, loss_fn, model=holder, **options)

    def tensor(self, array: np.ndarray) -> mx.array:
        return to_mlx(np.asarray(array))

    def encoder(self, dim_in: int, dim_out: int, rows_kept: int | None = None) -> Any:
        linear = nn.Linear(dim_in, dim_out)
        linear.set_dtype(mx.float64)
        return linear if rows_kept is None else RowsKept(linear, rows_kept)

    def loss(self, kind: str = "scalar") -> Any:
        if kind == "vector":
            return lambda *reps: mx.concatenate(reps).sum(axis=1)
        return lambda *reps: mx.mean(mx.logsumexp(reps[0] @ mx.concatenate(reps).T, axis=1))


def _flat(module: nn.Module) -> list:
    from mlx.utils import tree_flatten
    return tree_flatten(module.trainable_parameters())
