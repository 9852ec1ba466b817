"""The contract problem of :mod:`gradcache.testing.contract`, written in TensorFlow.

Two flavours of the same encoder: a ``tf.Module`` drawing its dropout masks from a
``tf.random.Generator``, and a Keras layer drawing them from a ``keras.random.SeedGenerator``.
Three ways to run the cached step: eagerly, inside ``tf.function``, and under ``jit_compile=True``
(XLA draws other masks than TensorFlow's kernels for the same seed, so there the chunk-by-chunk
dropout reference is compiled too).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

import gradcache_tf
import tests.tf  # noqa: F401
from gradcache.testing.contract import Fault, ProblemSpec, Result


class ContractModule(tf.Module):
    """``h = tanh(dropout(x) @ W + b)`` with masks from a shared ``tf.random.Generator``."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray, spec: ProblemSpec,
                 generator: tf.random.Generator):
        super().__init__()
        self.W = tf.Variable(weight)
        self.b = tf.Variable(bias)
        self.rate = spec.dropout
        self.nested_output = spec.nested_output
        self.generator = generator

    def __call__(self, x: tf.Tensor, extra: tuple | None = None) -> Any:
        if extra is not None:
            x = x + 0.5 * extra[0]
        if self.rate:
            keep = self.generator.uniform(tf.shape(x), dtype=x.dtype) >= self.rate
            x = tf.where(keep, x / (1.0 - self.rate), tf.zeros_like(x))
        h = tf.tanh(x @ self.W + self.b)
        return (h, {"sq": h * h}) if self.nested_output else h


def contract_layer_class() -> type:
    """The Keras flavour (built on demand so that importing this module does not need Keras)."""
    import keras

    class ContractLayer(keras.layers.Layer):
        """The same encoder as a Keras layer; masks from a ``keras.random.SeedGenerator``."""

        def __init__(self, weight: np.ndarray, bias: np.ndarray, spec: ProblemSpec,
                     seed_generator: Any):
            super().__init__(dtype=spec.dtype)
            self.W = self.add_weight(shape=weight.shape, initializer="zeros", name="W")
            self.b = self.add_weight(shape=bias.shape, initializer="zeros", name="b")
            self.W.assign(weight)
            self.b.assign(bias)
            self.rate = spec.dropout
            self.nested_output = spec.nested_output
            self.seed_generator = seed_generator

        def call(self, inputs: Any, training: bool = False) -> Any:
            x = inputs["x"] + 0.5 * inputs["extra"][0] if isinstance(inputs, dict) else inputs
            if training and self.rate:
                x = keras.random.dropout(x, self.rate, seed=self.seed_generator)
            h = tf.tanh(x @ self.W + self.b)
            return (h, {"sq": h * h}) if self.nested_output else h

    return ContractLayer


class ContractLoss(tf.Module):
    """InfoNCE of group 0 against every group, with a (possibly learnable) scale."""

    def __init__(self, scale: np.ndarray, spec: ProblemSpec):
        super().__init__()
        self.scale = tf.Variable(np.array(scale), trainable=spec.learnable_scale)
        self.nested = spec.nested_output

    def __call__(self, *reps: Any) -> tf.Tensor:
        rows = [r[0] + 0.5 * r[1]["sq"] if self.nested else r for r in reps]
        scores = self.scale * tf.matmul(rows[0], tf.concat(rows, 0), transpose_b=True)
        return tf.reduce_mean(tf.reduce_logsumexp(scores, axis=1) - tf.linalg.diag_part(scores))


def to_tf(tree: Any) -> Any:
    if isinstance(tree, np.ndarray):
        return tf.constant(tree)
    if isinstance(tree, dict):
        return {k: to_tf(v) for k, v in tree.items()}
    if isinstance(tree, tuple):
        return tuple(to_tf(v) for v in tree)
    return tree


def take(x: Any, start: int, stop: int) -> Any:
    if isinstance(x, dict):
        return {k: take(v, start, stop) for k, v in x.items()}
    if isinstance(x, tuple):
        return tuple(take(v, start, stop) for v in x)
    return x[start:stop]


def cat_reps(parts: list) -> Any:
    if isinstance(parts[0], tuple):
        return (tf.concat([p[0] for p in parts], 0),
                {"sq": tf.concat([p[1]["sq"] for p in parts], 0)})
    return tf.concat(parts, 0)


class Problem:
    """One built instance of the contract problem."""

    def __init__(self, spec: ProblemSpec, flavor: str):
        arrays = spec.arrays()
        self.spec = spec
        self.flavor = flavor
        if flavor == "keras":
            import keras
            self.random = keras.random.SeedGenerator(spec.seed)
            make = contract_layer_class()
        else:
            self.random = tf.random.Generator.from_seed(spec.seed)
            make = ContractModule
        distinct = [make(arrays["params"][f"enc{e}.W"], arrays["params"][f"enc{e}.b"], spec,
                         self.random) for e in range(spec.num_encoders)]
        per_group = distinct * len(spec.batch_sizes) if spec.shared_encoder else distinct
        self.encoders = per_group[: len(spec.batch_sizes)]
        self.inputs = [to_tf(x) for x in arrays["inputs"]]
        self.loss = ContractLoss(arrays["scale"], spec)
        self.names: dict[int, str] = {}
        for e, encoder in enumerate(distinct):
            self.names[id(gradcache_tf._rng.as_tf_variable(encoder.W))] = f"enc{e}.W"
            self.names[id(gradcache_tf._rng.as_tf_variable(encoder.b))] = f"enc{e}.b"
        if spec.learnable_scale:
            self.names[id(self.loss.scale)] = "scale"

    def objective(self, loss: tf.Tensor) -> tf.Tensor:
        """What is differentiated: ``upstream * loss``, plus ``0.5 * sum(enc0.b ** 2)`` with
        ``extra_term``."""
        total = tf.cast(self.spec.upstream, loss.dtype) * loss
        if self.spec.extra_term:
            total += 0.5 * tf.cast(tf.reduce_sum(self.encoders[0].b ** 2), loss.dtype)
        return total

    def variables(self) -> list:
        return gradcache_tf.trainable_variables(self.encoders, self.loss)

    def call(self, encoder: Any, x: Any) -> Any:
        if self.flavor == "keras":
            return encoder(x, training=True)
        return encoder(**x) if isinstance(x, dict) else encoder(x)

    def named(self, variables: list, grads: list) -> dict:
        out = {}
        for variable, grad in zip(variables, grads, strict=True):
            name = self.names[id(gradcache_tf._rng.as_tf_variable(variable))]
            out[name] = None if grad is None else np.array(grad)
        return out

    def rng_state(self) -> np.ndarray:
        return np.array(gradcache_tf._rng.as_tf_variable(self.random.state).numpy())


class _FailingStep:
    """The contract problem's step (with dropout, so that the random streams move) whose encoder
    and loss raise at an armed :class:`Fault`: in Python eagerly, through ``tf.py_function`` at
    run time inside ``tf.function``, counting encoder calls in a variable (ordered with the
    step's other stateful ops)."""

    def __init__(self, spec: ProblemSpec, mode: str, harness: TFHarness):
        spec = ProblemSpec(**{**spec.__dict__, "dropout": 0.25})
        self.problem = problem = Problem(spec, harness.flavor)
        self.variables = variables = problem.variables()
        self.fault = Fault()
        self.rng_after_forward: np.ndarray | None = None
        self.counter = counter = tf.Variable(0, trainable=False)
        eager = harness.mode == "eager"

        def encoder_check(count: Any) -> bool:
            self.fault.encoder_called(int(count))
            return True

        def loss_check() -> bool:
            self.fault.loss_called()
            return True

        def failing(encoder: Any) -> Any:
            def forward(*args: Any, **kwargs: Any) -> Any:
                x = args[0] if args else kwargs
                count = counter.assign_add(1)
                if eager:
                    encoder_check(count.numpy())
                    return problem.call(encoder, x)
                check = tf.py_function(encoder_check, [count], tf.bool)
                with tf.control_dependencies([check]):
                    return problem.call(encoder, x)
            return forward

        def failing_loss(*reps: Any) -> Any:
            value = problem.loss(*reps)
            if eager:
                loss_check()
                return value
            with tf.control_dependencies([tf.py_function(loss_check, [], tf.bool)]):
                return tf.identity(value)

        wrapped = {id(e): failing(e) for e in problem.encoders}
        encoders = [wrapped[id(e)] for e in problem.encoders]

        def step(*inputs: Any) -> Any:
            if mode == "cached":
                return gradcache_tf.cached_step(encoders, inputs, failing_loss,
                                                chunk_size=list(spec.chunk_sizes))
            with tf.GradientTape() as tape:
                loss = gradcache_tf.cached_loss(encoders, inputs, failing_loss,
                                                chunk_size=list(spec.chunk_sizes),
                                                variables=variables)
                if eager:
                    self.rng_after_forward = problem.rng_state()
                total = problem.objective(loss)
            return loss, tape.gradient(total, variables)

        self.run = harness._compiled(step, "eager" if eager else "function")

    def arm(self, fault: Fault) -> None:
        self.fault, self.rng_after_forward = fault, None
        self.counter.assign(0)


class TFHarness:
    """Runs the contract problem with ``mode`` in ``"eager"``, ``"function"`` or ``"xla"``."""

    features = frozenset({"nested_input", "nested_output", "dropout", "float32", "learnable_scale",
                          "separate_encoders", "rng_state", "cached_loss"})

    def __init__(self, mode: str = "eager", flavor: str = "module"):
        self.mode = mode
        self.flavor = flavor
        self.name = f"tf-{flavor}-{mode}"
        self._failing: dict = {}

    def _compiled(self, fn: Any, mode: str | None = None) -> Any:
        mode = mode or self.mode
        if mode == "eager":
            return fn
        return tf.function(fn, jit_compile=(mode == "xla"))

    def run(self, spec: ProblemSpec, mode: str) -> Result:
        problem = Problem(spec, self.flavor)
        variables = problem.variables()
        if mode == "cached":
            def step(*inputs: Any) -> Any:
                return gradcache_tf.cached_step(problem.encoders, inputs, problem.loss,
                                                chunk_size=list(spec.chunk_sizes))
            loss, grads = self._compiled(step)(*problem.inputs)
        elif mode == "cached_loss":
            def differentiated(*inputs: Any) -> Any:
                with tf.GradientTape() as tape:
                    loss = gradcache_tf.cached_loss(problem.encoders, inputs, problem.loss,
                                                    chunk_size=list(spec.chunk_sizes))
                    total = problem.objective(loss)
                return loss, tape.gradient(total, variables)
            loss, grads = self._compiled(differentiated)(*problem.inputs)
        elif mode == "full":
            with tf.GradientTape() as tape:
                loss = problem.loss(*[problem.call(e, x)
                                      for e, x in zip(problem.encoders, problem.inputs, strict=True)])
                total = problem.objective(loss)
            grads = tape.gradient(total, variables)
        elif mode == "chunked":
            def reference(*inputs: Any) -> Any:
                with tf.GradientTape() as tape:
                    reps = []
                    for encoder, x, size, chunk in zip(problem.encoders, inputs, spec.batch_sizes,
                                                       spec.chunk_sizes, strict=True):
                        reps.append(cat_reps([problem.call(encoder, take(x, s, min(s + chunk, size)))
                                              for s in range(0, size, chunk)]))
                    loss = problem.loss(*reps)
                return loss, tape.gradient(loss, variables)
            # The same compiler as the cached step, so that both draw masks with the same kernels.
            loss, grads = self._compiled(reference)(*problem.inputs)
        else:
            raise ValueError(mode)
        return Result(float(loss), problem.named(variables, grads), rng_after=problem.rng_state())

    def run_failing(self, spec: ProblemSpec, fault: Fault,
                    mode: str = "cached") -> tuple[dict, dict, BaseException | None]:
        """A cached step (or ``cached_loss`` and its ``tape.gradient``) into which ``fault`` is
        injected: at one encoder call over both passes, or in the loss.

        Gradients are returned, not written, so "untouched" means: the caller's accumulated
        gradients (a half-filled dict, as in gradient accumulation) gain nothing, the variables
        keep their values, and -- eagerly -- the random stream is back where it was. With dropout
        on, so that the stream really moves. Eagerly the encoder raises a Python error; inside
        ``tf.function`` the failure is raised by a ``tf.py_function`` while the graph runs (a
        trace-time count would see the loop body once), and TensorFlow reports it as an op error
        naming it. XLA cannot compile a ``py_function``, so that harness runs as ``function``.
        """
        step = self._failing_step(spec, mode)
        problem, variables = step.problem, step.variables
        accumulated = {name: None for name in problem.names.values()}
        accumulated["enc0.W"] = np.ones(problem.spec.arrays()["params"]["enc0.W"].shape)
        eager = self.mode == "eager"

        def snapshot() -> dict:
            state = dict(accumulated)
            for variable in variables:
                state["value:" + problem.names[id(gradcache_tf._rng.as_tf_variable(variable))]] = \
                    np.array(variable.numpy())
            if eager:
                state["rng"] = problem.rng_state()
            return state

        before = snapshot()
        step.arm(fault)
        error: BaseException | None = None
        try:
            step.run(*problem.inputs)
        except BaseException as raised:  # noqa: BLE001 - an op error, or the fault itself
            error = raised
        if step.rng_after_forward is not None:
            # a forward that succeeded has moved the random streams, as any forward does; a
            # failing backward must leave them there
            before["rng"] = step.rng_after_forward
        return before, snapshot(), error

    def _failing_step(self, spec: ProblemSpec, mode: str) -> _FailingStep:
        """Built (and traced) once per problem and mode: the fault is read when the step runs, so
        every fault the suite injects into one problem shares one graph."""
        key = (spec, mode)
        if key not in self._failing:
            # keep the last two: the suite alternates between a problem's two modes
            self._failing = dict(list(self._failing.items())[-1:])
            self._failing[key] = _FailingStep(spec, mode, self)
        return self._failing[key]

    # raw objects for the error tests
    def step(self, encoders: Any, inputs: Any, loss_fn: Any, **options: Any) -> Any:
        if self.mode == "eager":
            return gradcache_tf.cached_step(encoders, inputs, loss_fn, **options)
        return tf.function(lambda inputs: gradcache_tf.cached_step(encoders, inputs, loss_fn,
                                                                   **options))(inputs)

    def tensor(self, array: np.ndarray) -> tf.Tensor:
        return tf.constant(np.asarray(array))

    def encoder(self, dim_in: int, dim_out: int, rows_kept: int | None = None) -> Any:
        rng = np.random.default_rng(dim_in * 10 + dim_out)
        weight = tf.Variable(rng.normal(size=(dim_in, dim_out)))
        if rows_kept is None:
            return lambda x: x @ weight
        return lambda x: (x @ weight)[:rows_kept]

    def loss(self, kind: str = "scalar") -> Any:
        if kind == "vector":
            return lambda *reps: tf.reduce_sum(tf.concat(reps, 0), axis=1)
        return lambda *reps: tf.reduce_mean(tf.reduce_logsumexp(
            tf.matmul(reps[0], tf.concat(reps, 0), transpose_b=True), axis=1))
