"""The contract problem of :mod:`gradcache.testing.contract`, written in torch."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import gradcache_torch
from gradcache.testing.contract import Fault, ProblemSpec, Result


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
    keeps_first_graph = True   # the first chunk pass 2 pulls back keeps its graph from pass 1

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

    def run_failing(self, spec: ProblemSpec, fault: Fault,
                    mode: str = "cached") -> tuple[dict, dict, BaseException | None]:
        """The step with ``fault`` injected, from a half-accumulated state held as ZeRO or DDP's
        ``gradient_as_bucket_view`` hold it: ``enc0.W``'s (and a learnable scale's) ``.grad`` are
        views of one flat buffer, the other gradients ``None``. The state is each gradient's
        values, the identity of each ``.grad`` object and the flat buffer: a rollback must put
        back the same objects with the same values, in place."""
        encoders, inputs, loss_fn = self.build(spec)
        named = {}
        for e, encoder in enumerate(dict.fromkeys(encoders)):
            named[f"enc{e}.W"], named[f"enc{e}.b"] = encoder.W, encoder.b
        if spec.learnable_scale:
            named["scale"] = loss_fn.scale
        holding = [named["enc0.W"]] + ([loss_fn.scale] if spec.learnable_scale else [])
        flat = torch.linspace(-1.0, 1.0, sum(p.numel() for p in holding), dtype=holding[0].dtype)
        start = 0
        for parameter in holding:
            parameter.grad = flat[start:start + parameter.numel()].view_as(parameter)
            start += parameter.numel()

        def state() -> dict:
            out: dict = {"flat buffer": flat.numpy().copy()}
            for name, parameter in named.items():
                grad = parameter.grad
                out[name] = None if grad is None else grad.detach().numpy().copy()
                out[f"{name} .grad object"] = None if grad is None else id(grad)
            return out

        before = state()
        calls = {"n": 0}

        def failing(encoder: Any) -> Any:
            def forward(*args: Any, **kwargs: Any) -> Any:
                calls["n"] += 1
                fault.encoder_called(calls["n"])
                return encoder(*args, **kwargs)
            return forward

        def failing_loss(*reps: Any) -> torch.Tensor:
            value = loss_fn(*reps)
            fault.loss_called()
            return value

        wrapped = {id(e): failing(e) for e in encoders}
        failing_encoders = [wrapped[id(e)] for e in encoders]
        error: BaseException | None = None
        try:
            if mode == "cached_loss":
                loss = gradcache_torch.cached_loss(failing_encoders, inputs, failing_loss,
                                                   chunk_size=list(spec.chunk_sizes))
                (0.5 * loss).backward()
            else:
                gradcache_torch.cached_step(failing_encoders, inputs, failing_loss,
                                            chunk_size=list(spec.chunk_sizes))
        except BaseException as raised:  # noqa: BLE001 - a KeyboardInterrupt is a fault too
            error = raised
        return before, state(), error

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
