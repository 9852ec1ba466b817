"""The contract problem of :mod:`gradcache.testing.contract`, written in JAX.

Parameters live in one flat dict named as the contract reports gradients (``enc0.W``, ``enc0.b``,
``scale``), so ``grads`` needs no renaming. A learnable scale is a loss-owned parameter: the loss
then takes ``params`` (``loss_takes_params=True``); a fixed scale is a constant closed over. With
dropout, the chunk-by-chunk reference draws each chunk's mask from ``chunk_key(rng, group, chunk)``,
the key the step promises each chunk. The harness runs every step under ``jax.jit`` or eagerly.

The nothing-half-done contract, made meaningful for a functional backend: the caller owns an
accumulator of gradients (a half-filled one) and a jitted accumulate step ``acc + grads``. The
encoder fails at *run time* on its n-th evaluation, or the loss when it is evaluated (a host
callback that raises ``RuntimeError`` or ``KeyboardInterrupt``), inside the compiled loop of pass 1
or pass 2; the step must raise and the caller's accumulator must be what it was -- no partial sum
escapes the failed program.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import gradcache_jax
from gradcache.testing.contract import Fault, ProblemSpec, Result
from tests.jax.common import jit


def dropout_keep(key: Any, spec: ProblemSpec, shape: tuple) -> Any:
    """The contract's dropout mask (True = kept) for an input of ``shape`` under ``key``."""
    # a float32 threshold: 32 random bits per entry (cheaper to compile than float64's 64)
    return jax.random.bernoulli(key, np.float32(1.0 - spec.dropout), shape)


def contract_encoder(index: int, spec: ProblemSpec):
    """Encoder ``index`` of the contract problem as ``f(params, x[, key])``; the reference may
    hand it the dropout mask itself (``keep``) instead of the key that draws it."""

    def encoder(params: dict, x: Any, key: Any = None, *, keep: Any = None) -> Any:
        if isinstance(x, dict):
            x = x["x"] + 0.5 * x["extra"][0]
        if spec.dropout:
            keep = dropout_keep(key, spec, x.shape) if keep is None else keep
            x = jnp.where(keep, x / (1.0 - spec.dropout), 0.0)
        h = jnp.tanh(x @ params[f"enc{index}.W"] + params[f"enc{index}.b"])
        return (h, {"sq": h * h}) if spec.nested_output else h

    return encoder


def contract_loss(scale: Any, reps: tuple, nested: bool) -> Any:
    rows = [r[0] + 0.5 * r[1]["sq"] if nested else r for r in reps]
    scores = scale * rows[0] @ jnp.concatenate(rows).T
    return jnp.mean(jax.nn.logsumexp(scores, axis=1) - jnp.diagonal(scores))


def take(x: Any, start: int, stop: int) -> Any:
    return jax.tree_util.tree_map(lambda leaf: leaf[start:stop], x)


def concat(parts: list) -> Any:
    return jax.tree_util.tree_map(lambda *leaves: jnp.concatenate(leaves), *parts)


def to_numpy(grads: dict) -> dict:
    return {k: None if v is None else np.asarray(v).copy() for k, v in grads.items()}


def _jit(fn: Any) -> Any:
    # Every hypothesis draw has new shapes and compiles anew (the references too: run eagerly, each
    # of their ops would compile on its own, which is slower still). See tests.jax.common.jit.
    return jit(fn)


class Problem:
    """The contract problem for one spec: params, inputs, encoders and the loss, in JAX."""

    def __init__(self, spec: ProblemSpec):
        self.spec = spec
        arrays = spec.arrays()
        self.params = {k: jnp.asarray(v) for k, v in arrays["params"].items()}
        scale = jnp.asarray(arrays["scale"])
        if spec.learnable_scale:
            self.params["scale"] = scale
        self.inputs = [jax.tree_util.tree_map(jnp.asarray, x) for x in arrays["inputs"]]
        groups = len(spec.batch_sizes)
        self.per_group = [contract_encoder(0 if spec.shared_encoder else g, spec) for g in range(groups)]
        # one shared function, as a user would pass it, or one per group
        self.encoders = self.per_group[0] if spec.shared_encoder else self.per_group
        nested = spec.nested_output
        if spec.learnable_scale:
            self.loss = lambda params, *reps: contract_loss(params["scale"], reps, nested)
        else:
            self.loss = lambda *reps: contract_loss(scale, reps, nested)
        # a typed key of the "rbg" kind: exercises typed keys in the scanned loop, and compiles
        # faster than threefry (every hypothesis draw compiles anew)
        self.key = jax.random.key(spec.seed, impl="rbg")

    def full_loss(self, params: dict, reps: list) -> Any:
        return self.loss(params, *reps) if self.spec.learnable_scale else self.loss(*reps)

    def cached(self, params: dict, inputs: list, key: Any, encoders: Any = None) -> tuple:
        spec = self.spec
        return gradcache_jax.cached_step(
            self.encoders if encoders is None else encoders, inputs, self.loss,
            chunk_size=list(spec.chunk_sizes), params=params,
            rng=key if spec.dropout else None, loss_takes_params=spec.learnable_scale)

    def loss_function(self, inputs: list, key: Any, encoders: Any = None) -> Any:
        """``f(params)`` of :func:`gradcache_jax.cached_loss` for this problem."""
        spec = self.spec
        return gradcache_jax.cached_loss(
            self.encoders if encoders is None else encoders, inputs, self.loss,
            chunk_size=list(spec.chunk_sizes), rng=key if spec.dropout else None,
            loss_takes_params=spec.learnable_scale)

    def objective(self, loss: Any) -> Any:
        """What the contract differentiates: ``upstream * loss(params)`` plus the extra term.

        ``loss(params)`` is returned as the auxiliary value."""
        spec = self.spec

        def objective(params: dict) -> tuple[Any, Any]:
            value = loss(params)
            total = spec.upstream * value
            if spec.extra_term:
                total = total + 0.5 * jnp.sum(params["enc0.b"] ** 2)
            return total, value

        return objective

    def cached_loss_grads(self, params: dict, inputs: list, key: Any,
                          encoders: Any = None) -> tuple:
        """``(loss, grads)`` through ``jax.grad`` of the cached loss, scaled, plus the extra term."""
        objective = self.objective(self.loss_function(inputs, key, encoders))
        grads, loss = jax.grad(objective, has_aux=True)(params)
        return loss, grads


class _Injector:
    """The host side of a run-time fault: the compiled step calls :meth:`encoder` (per chunk
    evaluated) and :meth:`loss` through host callbacks, which raise at the armed fault."""

    def __init__(self) -> None:
        self.fault = Fault()
        self.count = 0

    def arm(self, fault: Fault) -> None:
        self.fault, self.count = fault, 0

    def encoder(self, _: Any) -> None:
        self.count += 1
        self.fault.encoder_called(self.count)

    def loss(self, _: Any) -> None:
        self.fault.loss_called()


class _FailingStep:
    """The contract problem's step with an encoder and a loss that fail at *run time* (a host
    callback that raises when the chunk, or the loss, is actually evaluated, inside the compiled
    loop of pass 1 or pass 2), accumulated into the caller's gradients as a jitted
    ``acc + grads``: no partial sum may escape the failed program."""

    def __init__(self, spec: ProblemSpec, mode: str, compile_: Any):
        self.problem = problem = Problem(spec)
        self.injector = injector = _Injector()

        def failing(encoder: Any) -> Any:
            @functools.wraps(encoder)
            def forward(params: dict, x: Any, key: Any = None) -> Any:
                jax.debug.callback(injector.encoder, jax.tree_util.tree_leaves(x)[0])
                return encoder(params, x, key)
            return forward

        loss = problem.loss

        def failing_loss(*args: Any) -> Any:
            value = loss(*args)
            jax.debug.callback(injector.loss, value)
            return value

        wrapped = {id(e): failing(e) for e in problem.per_group}
        encoders = (wrapped[id(problem.per_group[0])] if spec.shared_encoder
                    else [wrapped[id(e)] for e in problem.per_group])
        problem.loss = failing_loss

        def accumulate(acc: dict, params: dict, inputs: list, key: Any) -> dict:
            if mode == "cached_loss":   # the failure strikes inside the custom VJP's backward too
                _, grads = problem.cached_loss_grads(params, inputs, key, encoders=encoders)
            else:
                _, grads = problem.cached(params, inputs, key, encoders=encoders)
            return {k: grads[k] if acc[k] is None else acc[k] + grads[k] for k in acc}

        self.run = compile_(accumulate)


class JaxHarness:
    """Runs the contract problem with ``gradcache_jax``; ``jit`` picks jitted or eager steps."""

    features = frozenset({"nested_input", "nested_output", "dropout", "float32", "learnable_scale",
                          "separate_encoders", "cached_loss"})

    def __init__(self, *, jit: bool = True):
        self.jit = jit
        self._failing: dict = {}
        self.name = "jax (jit)" if jit else "jax (eager)"

    def _maybe_jit(self, fn: Any) -> Any:
        return _jit(fn) if self.jit else fn

    def run(self, spec: ProblemSpec, mode: str) -> Result:
        problem = Problem(spec)
        if mode == "cached":
            loss, grads = self._maybe_jit(problem.cached)(problem.params, problem.inputs, problem.key)
        elif mode == "cached_loss":
            loss, grads = self._maybe_jit(problem.cached_loss_grads)(problem.params, problem.inputs,
                                                                     problem.key)
        elif mode == "full":
            if spec.dropout:
                raise ValueError("the full-batch reference has no dropout; use 'chunked'")

            def full(params: dict) -> Any:
                reps = [enc(params, x)
                        for enc, x in zip(problem.per_group, problem.inputs, strict=True)]
                return problem.full_loss(params, reps)

            # upstream * loss (+ the extra term), as the contract differentiates it
            grads, loss = _jit(jax.grad(problem.objective(full), has_aux=True))(problem.params)
        elif mode == "chunked":
            bounds = [[(start, min(start + chunk, size)) for start in range(0, size, chunk)]
                      for size, chunk in zip(spec.batch_sizes, spec.chunk_sizes, strict=True)]
            # Each chunk's mask is drawn with the key the step promises that chunk. They are drawn
            # here, op by op (a few shapes, compiled once), so that the jitted reference below does
            # not unroll one random generator per chunk: up to 39 of them, slow to compile.
            masks = [[dropout_keep(gradcache_jax.chunk_key(problem.key, group, index), spec,
                                   (stop - start, spec.dim_in)) if spec.dropout else None
                      for index, (start, stop) in enumerate(group_bounds)]
                     for group, group_bounds in enumerate(bounds)]

            def chunked(params: dict, masks: list) -> Any:
                reps = []
                for enc, x, group_bounds, group_masks in zip(problem.per_group, problem.inputs,
                                                             bounds, masks, strict=True):
                    reps.append(concat([enc(params, take(x, start, stop), keep=keep)
                                        for (start, stop), keep in zip(group_bounds, group_masks,
                                                                       strict=True)]))
                return problem.full_loss(params, reps)

            loss, grads = _jit(jax.value_and_grad(chunked))(problem.params, masks)
        else:
            raise ValueError(mode)
        return Result(float(loss), to_numpy(grads))

    def run_failing(self, spec: ProblemSpec, fault: Fault,
                    mode: str = "cached") -> tuple[dict, dict, BaseException | None]:
        step, params = self._failing_step(spec, mode)
        problem = step.problem
        # the caller's half-filled accumulator: one entry holds gradients, the others none yet
        accumulated: dict = {name: None for name in params}
        accumulated["enc0.W"] = jnp.ones_like(params["enc0.W"])
        before = to_numpy(accumulated)
        step.injector.arm(fault)
        error: BaseException | None = None
        try:
            result = step.run(accumulated, params, problem.inputs, problem.key)
            accumulated = jax.block_until_ready(result)
        except BaseException as raised:  # noqa: BLE001 - JaxRuntimeError, or the fault itself
            error = raised
        return before, to_numpy(accumulated), error

    def _failing_step(self, spec: ProblemSpec, mode: str) -> tuple[Any, dict]:
        """The step ``run_failing`` runs, built (and compiled) once per problem and mode: the
        fault is read by the host callbacks at run time, so every fault on one problem shares one
        program (the suite injects many into the same problem)."""
        key = (spec, mode)
        if key not in self._failing:
            # keep the last two: the suite alternates between a problem's two modes
            self._failing = dict(list(self._failing.items())[-1:])
            self._failing[key] = _FailingStep(spec, mode, self._maybe_jit)
        step = self._failing[key]
        return step, step.problem.params

    # raw objects for the error tests
    def step(self, encoders: Any, inputs: Any, loss_fn: Any, **options: Any) -> Any:
        many = encoders if isinstance(encoders, (list, tuple)) else [encoders]
        params = {enc.name: enc.weight for enc in many if isinstance(enc, LinearEncoder)}
        step = self._maybe_jit(lambda params, inputs: gradcache_jax.cached_step(
            encoders, inputs, loss_fn, params=params, **options))
        return step(params, inputs)

    def tensor(self, array: np.ndarray) -> jax.Array:
        return jnp.asarray(array)

    def encoder(self, dim_in: int, dim_out: int, rows_kept: int | None = None) -> Any:
        return LinearEncoder(dim_in, dim_out, rows_kept)

    def loss(self, kind: str = "scalar") -> Any:
        if kind == "vector":
            return lambda *reps: jnp.concatenate(reps).sum(axis=1)
        return lambda *reps: jnp.mean(jax.nn.logsumexp(reps[0] @ jnp.concatenate(reps).T, axis=1))


class LinearEncoder:
    """``x @ params[name]`` for the error tests; with ``rows_kept`` it (wrongly) drops rows."""

    _count = 0

    def __init__(self, dim_in: int, dim_out: int, rows_kept: int | None):
        LinearEncoder._count += 1
        self.name = f"linear{LinearEncoder._count}"
        self.weight = jax.random.normal(jax.random.PRNGKey(LinearEncoder._count), (dim_in, dim_out),
                                        dtype=jnp.float64)
        self.rows_kept = rows_kept

    def __call__(self, params: dict, x: Any) -> Any:
        out = x @ params[self.name]
        return out if self.rows_kept is None else out[: self.rows_kept]
