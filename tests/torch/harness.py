"""The contract problem of :mod:`gradcache.testing.contract`, written in torch."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import gradcache_torch
from gradcache.testing.contract import ProblemSpec, Result


class ContractEncoder(torch.nn.Module):
    def __init__(self, weight: np.ndarray, bias: np.ndarray, spec: ProblemSpec):
        super().__init__()
        self.W = torch.nn.Parameter(torch.from_numpy(weight.copy()))
        self.b = torch.nn.Parameter(torch.from_numpy(bias.copy()))
        self.dropout = spec.dropout
        self.nested_output = spec.nested_output

    def forward(self, x: torch.Tensor, extra: tuple | None = None) -> Any:
        if extra is not None:
            x = x + 0.5 * extra[0]
        if self.dropout:
            x = F.dropout(x, self.dropout, training=True)
        h = torch.tanh(x @ self.W + self.b)
        return (h, {"sq": h * h}) if self.nested_output else h


class ContractLoss(torch.nn.Module):
    def __init__(self, scale: np.ndarray, spec: ProblemSpec):
        super().__init__()
        value = torch.from_numpy(np.array(scale))
        if spec.learnable_scale:
            self.scale = torch.nn.Parameter(value)
        else:
            self.register_buffer("scale", value)
        self.nested = spec.nested_output

    def forward(self, *reps: Any) -> torch.Tensor:
        rows = [r[0] + 0.5 * r[1]["sq"] if self.nested else r for r in reps]
        scores = self.scale * rows[0] @ torch.cat(rows).T
        return (torch.logsumexp(scores, dim=1) - scores.diagonal()).mean()


def to_torch(tree: Any) -> Any:
    if isinstance(tree, np.ndarray):
        return torch.from_numpy(tree)
    if isinstance(tree, dict):
        return {k: to_torch(v) for k, v in tree.items()}
    if isinstance(tree, tuple):
        return tuple(to_torch(v) for v in tree)
    return tree


def call(encoder: Any, x: Any) -> Any:
    return encoder(**x) if isinstance(x, dict) else encoder(x)


def take(x: Any, start: int, stop: int) -> Any:
    if isinstance(x, dict):
        return {k: take(v, start, stop) for k, v in x.items()}
    if isinstance(x, tuple):
        return tuple(take(v, start, stop) for v in x)
    return x[start:stop]


def cat_reps(parts: list) -> Any:
    first = parts[0]
    if isinstance(first, tuple):
        return (torch.cat([p[0] for p in parts]), {"sq": torch.cat([p[1]["sq"] for p in parts])})
    return torch.cat(parts)


class TorchHarness:
    name = "torch"
    features = frozenset({"nested_input", "nested_output", "dropout", "float32", "learnable_scale",
                          "separate_encoders", "rng_state", "cached_loss"})

    def build(self, spec: ProblemSpec) -> tuple[list, list, ContractLoss]:
        arrays = spec.arrays()
        encoders = [ContractEncoder(arrays["params"][f"enc{e}.W"], arrays["params"][f"enc{e}.b"], spec)
                    for e in range(spec.num_encoders)]
        per_group = encoders * len(spec.batch_sizes) if spec.shared_encoder else encoders
        inputs = [to_torch(x) for x in arrays["inputs"]]
        return per_group[: len(spec.batch_sizes)], inputs, ContractLoss(arrays["scale"], spec)

    @staticmethod
    def grads(encoders: list, loss: ContractLoss, spec: ProblemSpec) -> dict:
        grads = {}
        for e, encoder in enumerate(dict.fromkeys(encoders)):
            grads[f"enc{e}.W"] = encoder.W.grad
            grads[f"enc{e}.b"] = encoder.b.grad
        if spec.learnable_scale:
            grads["scale"] = loss.scale.grad
        return {k: None if v is None else v.detach().numpy().copy() for k, v in grads.items()}

    @staticmethod
    def differentiate(loss: torch.Tensor, encoders: list, spec: ProblemSpec) -> None:
        """Backward of what the contract differentiates: ``upstream * loss`` plus the extra term."""
        total = spec.upstream * loss
        if spec.extra_term:
            total = total + 0.5 * (encoders[0].b ** 2).sum()
        total.backward()

    def run(self, spec: ProblemSpec, mode: str) -> Result:
        encoders, inputs, loss_fn = self.build(spec)
        torch.manual_seed(spec.seed)
        if mode == "cached":
            loss = gradcache_torch.cached_step(encoders, inputs, loss_fn, chunk_size=list(spec.chunk_sizes))
        elif mode == "cached_loss":
            loss = gradcache_torch.cached_loss(encoders, inputs, loss_fn,
                                               chunk_size=list(spec.chunk_sizes))
            self.differentiate(loss, encoders, spec)
        elif mode == "full":
            loss = loss_fn(*[call(e, x) for e, x in zip(encoders, inputs)])
            self.differentiate(loss, encoders, spec)
        elif mode == "chunked":
            reps = []
            for encoder, x, size, chunk in zip(encoders, inputs, spec.batch_sizes, spec.chunk_sizes):
                parts = [call(encoder, take(x, s, min(s + chunk, size))) for s in range(0, size, chunk)]
                reps.append(cat_reps(parts))
            loss = loss_fn(*reps)
            self.differentiate(loss, encoders, spec)
        else:
            raise ValueError(mode)
        return Result(float(loss.detach()), self.grads(encoders, loss_fn, spec),
                      rng_after=torch.get_rng_state().numpy().copy())

    def run_failing(self, spec: ProblemSpec, fail_at_call: int,
                    mode: str = "cached") -> tuple[dict, dict]:
        encoders, inputs, loss_fn = self.build(spec)
        # a half-accumulated state: the first encoder already holds gradients, the others none
        encoders[0].W.grad = torch.ones_like(encoders[0].W)
        if spec.learnable_scale:
            loss_fn.scale.grad = torch.full_like(loss_fn.scale, 3.0)   # deferred, then restored
        before = self.grads(encoders, loss_fn, spec)
        calls = {"n": 0}

        def failing(encoder: Any) -> Any:
            def forward(*args: Any, **kwargs: Any) -> Any:
                calls["n"] += 1
                if calls["n"] == fail_at_call:
                    raise RuntimeError("injected failure")
                return encoder(*args, **kwargs)
            return forward

        wrapped = {id(e): failing(e) for e in encoders}
        try:
            if mode == "cached_loss":
                loss = gradcache_torch.cached_loss([wrapped[id(e)] for e in encoders], inputs,
                                                   loss_fn, chunk_size=list(spec.chunk_sizes))
                (0.5 * loss).backward()
            else:
                gradcache_torch.cached_step([wrapped[id(e)] for e in encoders], inputs, loss_fn,
                                            chunk_size=list(spec.chunk_sizes))
        except RuntimeError as error:
            assert "injected failure" in str(error)
        else:
            raise AssertionError("the injected failure did not propagate")
        return before, self.grads(encoders, loss_fn, spec)

    # raw objects for the error tests
    def step(self, encoders: Any, inputs: Any, loss_fn: Any, **options: Any) -> Any:
        return gradcache_torch.cached_step(encoders, inputs, loss_fn, **options)

    def tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.asarray(array))

    def encoder(self, dim_in: int, dim_out: int, rows_kept: int | None = None) -> Any:
        linear = torch.nn.Linear(dim_in, dim_out, dtype=torch.float64)
        if rows_kept is None:
            return linear
        return lambda x: linear(x)[:rows_kept]

    def loss(self, kind: str = "scalar") -> Any:
        if kind == "vector":
            return lambda *reps: torch.cat(reps).sum(dim=1)
        return lambda *reps: torch.logsumexp(reps[0] @ torch.cat(reps).T, dim=1).mean()
