"""The contract problem in plain numpy with hand-written gradients, run by the numpy backend.

It proves the core's schedule with no framework at all (dropout and nesting are left to the
framework harnesses, whose autodiff is the independent reference).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gradcache import cached_backward, cached_forward, run_cached_step
from gradcache.testing import NumpyBackend, NumpyInfoNCE
from gradcache.testing.contract import Fault, ProblemSpec, Result


class TanhEncoder:
    """``tanh(x @ W + b)`` with its vjp by hand."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray, rows_kept: int | None = None):
        self.weight, self.bias, self.rows_kept = weight, bias, rows_kept

    def __call__(self, x: np.ndarray) -> np.ndarray:
        out = np.tanh(x @ self.weight + self.bias)
        return out if self.rows_kept is None else out[: self.rows_kept]

    def vjp(self, x: np.ndarray, rep_grad: np.ndarray) -> tuple[np.ndarray, dict]:
        h = np.tanh(x @ self.weight + self.bias)
        dz = rep_grad * (1.0 - h * h)
        return h, {"W": x.T @ dz, "b": dz.sum(axis=0)}


class VectorLoss:
    def value_and_grad(self, *reps: np.ndarray) -> tuple:
        return np.concatenate(reps).sum(axis=1), [np.ones_like(r) for r in reps]


class NumpyHarness:
    name = "numpy"
    # "cached_loss" here is the core's two halves with an upstream gradient: numpy has no autodiff
    # to drive them, so the harness adds the extra term's gradient by hand
    features = frozenset({"separate_encoders", "float32", "cached_loss"})

    def build(self, spec: ProblemSpec) -> tuple[list, list]:
        arrays = spec.arrays()
        encoders = [TanhEncoder(arrays["params"][f"enc{e}.W"], arrays["params"][f"enc{e}.b"])
                    for e in range(spec.num_encoders)]
        per_group = encoders * len(spec.batch_sizes) if spec.shared_encoder else encoders
        return per_group[: len(spec.batch_sizes)], arrays["inputs"]

    @staticmethod
    def named(encoders: list, grads: dict) -> dict:
        out = {}
        for e, encoder in enumerate(dict.fromkeys(encoders)):
            for name in ("W", "b"):
                out[f"enc{e}.{name}"] = grads.get(id(encoder), {}).get(name)
        return out

    def run(self, spec: ProblemSpec, mode: str) -> Result:
        encoders, inputs = self.build(spec)
        loss_fn = NumpyInfoNCE(scale=2.0)
        if mode == "cached":
            loss, grads = run_cached_step(NumpyBackend(), encoders, inputs, loss_fn,
                                          chunk_size=list(spec.chunk_sizes))
        elif mode == "cached_loss":
            forward = cached_forward(NumpyBackend(), encoders, inputs, loss_fn,
                                     chunk_size=list(spec.chunk_sizes))
            loss, grads = forward.loss, cached_backward(forward, upstream=spec.upstream)
            self.add_extra_term(spec, encoders, grads)
        elif mode == "full":
            reps = [encoder(x) for encoder, x in zip(encoders, inputs)]
            loss, rep_grads = loss_fn.value_and_grad(*reps)
            grads = {}
            for encoder, x, g in zip(encoders, inputs, rep_grads):
                mine = grads.setdefault(id(encoder), {})
                for name, value in encoder.vjp(x, spec.upstream * g)[1].items():
                    mine[name] = mine.get(name, 0.0) + value
            self.add_extra_term(spec, encoders, grads)
        else:
            raise ValueError(mode)
        return Result(float(loss), self.named(encoders, grads))

    @staticmethod
    def add_extra_term(spec: ProblemSpec, encoders: list, grads: dict) -> None:
        """The gradient of ``0.5 * sum(enc0.b ** 2)`` (the contract's extra term)."""
        if spec.extra_term:
            first = encoders[0]
            mine = grads.setdefault(id(first), {})
            mine["b"] = mine.get("b", 0.0) + first.bias

    def run_failing(self, spec: ProblemSpec, fault: Fault,
                    mode: str = "cached") -> tuple[dict, dict, BaseException | None]:
        """A functional backend: gradients are returned, so the state is the parameters the caller
        holds (a failed step returns nothing to accumulate)."""
        encoders, inputs = self.build(spec)
        calls = {"n": 0}

        class Failing:
            def __init__(self, inner: TanhEncoder):
                self.inner = inner

            def _tick(self) -> None:
                calls["n"] += 1
                fault.encoder_called(calls["n"])

            def __call__(self, x: np.ndarray) -> np.ndarray:
                self._tick()
                return self.inner(x)

            def vjp(self, x: np.ndarray, g: np.ndarray) -> tuple:
                self._tick()
                return self.inner.vjp(x, g)

        class FailingLoss(NumpyInfoNCE):
            def value_and_grad(self, *reps: np.ndarray) -> tuple:
                value = super().value_and_grad(*reps)
                fault.loss_called()
                return value

        def state() -> dict:
            return {f"enc{e}.{n}": getattr(enc, {"W": "weight", "b": "bias"}[n]).copy()
                    for e, enc in enumerate(dict.fromkeys(encoders)) for n in ("W", "b")}

        wrapped = {id(e): Failing(e) for e in encoders}
        before = state()
        failing = [wrapped[id(e)] for e in encoders]
        error: BaseException | None = None
        try:
            if mode == "cached_loss":
                forward = cached_forward(NumpyBackend(), failing, inputs, FailingLoss(2.0),
                                         chunk_size=list(spec.chunk_sizes))
                cached_backward(forward, upstream=0.5)
            else:
                run_cached_step(NumpyBackend(), failing, inputs, FailingLoss(2.0),
                                chunk_size=list(spec.chunk_sizes))
        except BaseException as raised:  # noqa: BLE001 - a KeyboardInterrupt is a fault too
            error = raised
        return before, state(), error

    def step(self, encoders: Any, inputs: Any, loss_fn: Any, **options: Any) -> Any:
        return run_cached_step(NumpyBackend(), encoders, inputs, loss_fn, **options)

    def tensor(self, array: np.ndarray) -> np.ndarray:
        return np.asarray(array)

    def encoder(self, dim_in: int, dim_out: int, rows_kept: int | None = None) -> TanhEncoder:
        rng = np.random.default_rng(1)
        return TanhEncoder(rng.normal(size=(dim_in, dim_out)), np.zeros(dim_out), rows_kept)

    def loss(self, kind: str = "scalar") -> Any:
        return VectorLoss() if kind == "vector" else NumpyInfoNCE()
