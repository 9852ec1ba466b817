"""The contract every gradcache backend keeps, as a property-based test suite (pytest + hypothesis).

An adapter's tests subclass :class:`BackendContract` and set ``harness`` to an object implementing
:class:`Harness` for their framework: it builds the *contract problem* (below) from a
:class:`ProblemSpec` in that framework, and runs it cached, full-batch, or chunk by chunk with a
graph. The suite then checks exactness against full-batch autodiff over hypothesis-drawn shapes,
chunk sizes, groups, nesting and dtypes; the replay of dropout against a chunk-by-chunk reference;
the nothing-half-done rule, by injecting a :class:`Fault` at every point of a step (each encoder
call of both passes, the loss; an ``Exception`` and a ``KeyboardInterrupt``); and the errors for bad
input. It imports no framework itself.

The contract problem, which every harness implements identically:

* encoder ``i`` (or one shared encoder) has parameters ``W`` (``dim_in x dim_out``) and ``b``;
  ``h = tanh(dropout(x) @ W + b)``, where ``x`` is the input, or ``x + 0.5 * x2`` for the nested
  input ``{"x": x, "extra": (x2,)}``;
* the output is ``h``, or the nested ``(h, {"sq": h * h})``, which the loss combines as
  ``h + 0.5 * sq``;
* the loss is InfoNCE of group 0's rows against the rows of every group:
  ``scores = scale * r0 @ concat(r).T``, ``loss = mean(logsumexp(scores, 1) - diag(scores))``, with
  ``scale`` a loss-owned learnable parameter when ``learnable_scale``;
* what is differentiated is ``upstream * loss`` -- plus ``0.5 * sum(enc0.b ** 2)``, a term the
  encoder's parameters have outside the loss, with ``extra_term`` -- as a trainer scales a loss
  (``loss / accumulation_steps``, a loss scale) and adds other terms; ``Result.loss`` is the loss
  alone. ``cached_step`` runs only ``upstream == 1`` without the term; ``cached_loss`` runs any;
* parameters come from ``numpy.random.default_rng(seed)``: for each encoder in order, ``W`` then
  ``b`` (``normal(scale=0.5)``), then the inputs of each group (``x`` then ``x2``), then ``scale``
  starts at 2.0. Gradients are reported as ``{"enc0.W": ..., "enc0.b": ..., "scale": ...}``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

try:
    import pytest
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ModuleNotFoundError as missing:  # the suite is pytest + hypothesis: name what installs them
    from gradcache._distribution import install_hint

    raise ModuleNotFoundError(f"gradcache.testing.contract needs pytest and hypothesis ({missing}): "
                              f"{install_hint('testing')}", name=missing.name) from None

from gradcache import GradCacheError
from gradcache.testing._budget import examples


@dataclass(frozen=True)
class ProblemSpec:
    """One draw of the contract problem."""

    batch_sizes: tuple[int, ...]
    chunk_sizes: tuple[int, ...]
    dim_in: int = 3
    dim_out: int = 4
    shared_encoder: bool = True
    nested_input: bool = False
    nested_output: bool = False
    dropout: float = 0.0
    learnable_scale: bool = True
    dtype: str = "float64"
    seed: int = 0
    upstream: float = 1.0
    extra_term: bool = False

    @property
    def num_encoders(self) -> int:
        return 1 if self.shared_encoder else len(self.batch_sizes)

    @property
    def num_chunks(self) -> int:
        """Chunks over every group: each pass calls the encoders this many times."""
        return sum(-(-size // chunk) for size, chunk in zip(self.batch_sizes, self.chunk_sizes))

    def arrays(self) -> dict[str, Any]:
        """The parameters and inputs as numpy arrays, drawn in the documented order."""
        rng = np.random.default_rng(self.seed)
        dtype = np.dtype(self.dtype)
        params = {}
        for e in range(self.num_encoders):
            params[f"enc{e}.W"] = rng.normal(scale=0.5, size=(self.dim_in, self.dim_out)).astype(dtype)
            params[f"enc{e}.b"] = rng.normal(scale=0.5, size=(self.dim_out,)).astype(dtype)
        inputs: list[Any] = []
        for size in self.batch_sizes:
            x = rng.normal(size=(size, self.dim_in)).astype(dtype)
            if self.nested_input:
                x2 = rng.normal(size=(size, self.dim_in)).astype(dtype)
                inputs.append({"x": x, "extra": (x2,)})
            else:
                inputs.append(x)
        return {"params": params, "inputs": inputs, "scale": np.asarray(2.0, dtype=dtype)}


@dataclass
class Result:
    """What one run of the contract problem produced, as numpy."""

    loss: float
    grads: dict[str, np.ndarray]
    rng_after: Any = None
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Fault:
    """A failure :meth:`Harness.run_failing` injects into a step.

    ``where="encoder"``: the encoder raises on its ``call``-th call, counting from 1 over both
    passes and every group (calls ``1 .. num_chunks`` are pass 1, the rest pass 2; the last one is
    pass 2's last chunk; a backend that keeps the first chunk's graph calls it once fewer in pass
    2: :func:`encoder_calls`). ``where="loss"``: the loss raises after computing its value (``call`` is
    unused). ``interrupt``: the error is a ``KeyboardInterrupt`` -- a ``BaseException``, as Ctrl-C
    raises it -- instead of a ``RuntimeError``. A harness wraps its encoders and loss so that they
    call :meth:`encoder_called` and :meth:`loss_called` (which raise at the fault), or does the same
    at run time inside a compiled program (a host callback, ``tf.py_function``).
    """

    where: str = "encoder"
    call: int = 1
    interrupt: bool = False

    MESSAGE = "injected failure"

    @property
    def exception(self) -> type[BaseException]:
        return KeyboardInterrupt if self.interrupt else RuntimeError

    def encoder_called(self, count: int) -> None:
        """Raises if the encoder's ``count``-th call (from 1) is the fault."""
        if self.where == "encoder" and count == self.call:
            raise self.exception(self.MESSAGE)

    def loss_called(self) -> None:
        """Raises if the fault is in the loss."""
        if self.where == "loss":
            raise self.exception(self.MESSAGE)

    def raised(self, error: BaseException | None) -> bool:
        """Whether ``error`` -- what the step let out -- is this fault: the exception itself, its
        type kept (a library must neither swallow an interrupt nor turn it into its own error),
        or a framework's error reporting it by type and message (a failure inside a compiled
        program: JAX's runtime error, TensorFlow's op error)."""
        if error is None:
            return False
        if type(error) is self.exception:
            return self.MESSAGE in str(error)
        return f"{self.exception.__name__}: {self.MESSAGE}" in str(error)

    def __str__(self) -> str:
        kind = self.exception.__name__
        return f"{kind} in the loss" if self.where == "loss" else f"{kind} at encoder call {self.call}"


class Harness(Protocol):
    """What a backend's tests provide to run the contract suite."""

    name: str
    #: any of "nested_input", "nested_output", "dropout", "float32", "learnable_scale",
    #: "separate_encoders", "rng_state", "cached_loss"
    features: frozenset
    #: (optional, default False) the backend keeps the first chunk's graph from pass 1
    #: (:meth:`gradcache.Backend.encode_keeping_graph`): pass 2 calls the encoder once fewer
    keeps_first_graph: bool

    def run(self, spec: ProblemSpec, mode: str) -> Result:
        """Runs the problem: ``"cached"`` (the adapter's cached_step), ``"cached_loss"`` (the
        adapter's cached_loss, differentiated by the framework's own autodiff, times
        ``spec.upstream`` plus the extra term), ``"full"`` (one full-batch autodiff step) or
        ``"chunked"`` (chunk by chunk with a graph, groups and chunks in order)."""

    def run_failing(self, spec: ProblemSpec, fault: Fault,
                    mode: str = "cached") -> tuple[dict, dict, BaseException | None]:
        """Runs a cached step (``mode="cached"``), or a cached loss and its backward
        (``"cached_loss"``), into which ``fault`` is injected, from a caller's state that already
        holds gradients (some, not all: a half-accumulated step). Returns ``(before, after,
        error)``: the caller's state before and after, and what the step raised (caught as a
        ``BaseException``; ``None`` if it returned).

        The state is whatever the caller could observe, each entry a numpy array (compared
        exactly), ``None`` (must stay ``None``) or any other value compared with ``==``: the
        accumulated gradients, the variables' values, the random state, and where gradients live
        in place the identity of each gradient object (``id(p.grad)`` must not change) and the
        flat buffer they are views of. A failed step must leave all of it as it was."""

    def step(self, encoders: Any, inputs: Any, loss_fn: Any, **options: Any) -> Any:
        """Calls the adapter's cached_step on raw harness objects (for the error tests)."""

    def tensor(self, array: np.ndarray) -> Any:
        """A framework tensor holding ``array``."""

    def encoder(self, dim_in: int, dim_out: int, rows_kept: int | None = None) -> Any:
        """An encoder for :meth:`step`, mapping ``(n, dim_in)`` to ``(n, dim_out)``; with
        ``rows_kept`` it (wrongly) returns only that many rows."""

    def loss(self, kind: str = "scalar") -> Any:
        """A loss for :meth:`step` taking any number of reps; ``"vector"`` returns a vector."""


def relative_error(actual: Any, expected: Any) -> float:
    """``max|actual - expected| / max|expected|`` (absolute when ``expected`` is all zeros)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    scale = float(np.max(np.abs(expected), initial=0.0))
    diff = float(np.max(np.abs(actual - expected), initial=0.0))
    return diff / scale if scale > 0 else diff


# float64 is the exactness check. In float32 the full-batch reference rounds too, in another order:
# a gradient that is a sum with cancellation (a loss-owned scale's, over every logit) differs from it
# by up to ~1.8e-5 relative in random draws (seen on TF and JAX), so 1e-5 was a coin toss there.
TOLERANCE = {"float64": 1e-10, "float32": 1e-4}


def assert_results_close(actual: Result, expected: Result, dtype: str) -> None:
    tolerance = TOLERANCE[dtype]
    assert set(actual.grads) == set(expected.grads), (sorted(actual.grads), sorted(expected.grads))
    assert relative_error(actual.loss, expected.loss) <= tolerance, (actual.loss, expected.loss)
    # In float32 a gradient that cancels to nearly zero (a bias whose rows' contributions sum to
    # ~0) keeps the rounding of its terms, which are of the size of the step's other gradients:
    # measured against its own tiny maximum it fails by chance. There each gradient is measured
    # against the step's largest gradient; float64 keeps the strict per-gradient check.
    # A step whose gradients are all zero but for rounding (every input dropped by dropout: rows
    # all alike) is measured against the loss: the floor leaves about one ulp of the loss.
    floor = abs(float(expected.loss)) * (1e-6 if dtype == "float64" else 1e-3)
    if dtype != "float64":
        floor = max([floor, *(float(np.max(np.abs(np.asarray(g, np.float64)), initial=0.0))
                              for g in expected.grads.values() if g is not None)])
    for name in expected.grads:
        got, want = np.asarray(actual.grads[name], np.float64), np.asarray(expected.grads[name],
                                                                              np.float64)
        scale = max(float(np.max(np.abs(want), initial=0.0)), floor)
        diff = float(np.max(np.abs(got - want), initial=0.0))
        error = diff / scale if scale > 0 else diff
        assert error <= tolerance, f"{name}: relative error {error:.3g} > {tolerance:g}"


def _assert_unchanged(before: dict, after: dict, where: Any = "") -> None:
    assert set(before) == set(after), (sorted(before), sorted(after))
    for name in before:
        if before[name] is None:
            assert after[name] is None, f"{name}: a gradient appeared after a failed step ({where})"
        elif isinstance(before[name], np.ndarray):
            assert np.array_equal(before[name], after[name]), f"{name} changed ({where})"
        else:
            assert before[name] == after[name], f"{name} changed ({where})"


def _check_failure(harness: Harness, spec: ProblemSpec, fault: Fault, mode: str) -> None:
    before, after, error = harness.run_failing(spec, fault, mode)
    assert fault.raised(error), (
        f"{mode}: the step was to fail with {fault}, but " +
        ("returned normally" if error is None else f"raised {type(error).__name__}: {error}"))
    _assert_unchanged(before, after, f"{mode}, {fault}")


@st.composite
def faults(draw: Any, spec: ProblemSpec, calls: int | None = None) -> Fault:
    """Any fault in a step over ``spec``: one of its ``calls`` encoder calls (either pass; default
    two per chunk), or the loss; either exception type."""
    interrupt = draw(st.booleans())
    if draw(st.integers(0, 4)) == 0:
        return Fault("loss", interrupt=interrupt)
    return Fault("encoder", draw(st.integers(1, calls or 2 * spec.num_chunks)), interrupt)


def encoder_calls(harness: Any, spec: ProblemSpec) -> int:
    """The encoder calls of one step over ``spec``: one per chunk in each pass, less the first
    chunk's in pass 2 where the harness says its backend keeps that graph from pass 1
    (``keeps_first_graph``, :meth:`gradcache.Backend.encode_keeping_graph`)."""
    return 2 * spec.num_chunks - int(bool(getattr(harness, "keeps_first_graph", False)))


#: the named points of a step :meth:`BackendContract.test_every_fault_point_leaves_state_untouched`
#: injects at (see :func:`fault_at`)
FAULT_POINTS = ("pass-1", "pass-2", "last-chunk", "loss")


def fault_at(point: str, num_chunks: int, interrupt: bool = False,
             calls: int | None = None) -> Fault:
    """The fault at a named point of a step over ``num_chunks`` chunks and ``calls`` encoder calls
    (default two per chunk): ``"pass-1"`` (the first encoder call), ``"pass-2"`` (the first call
    of pass 2), ``"last-chunk"`` (pass 2's last call) or ``"loss"``."""
    if point == "loss":
        return Fault("loss", interrupt=interrupt)
    total = calls or 2 * num_chunks
    at = {"pass-1": 1, "pass-2": min(num_chunks + 1, total), "last-chunk": total}
    return Fault("encoder", at[point], interrupt)


#: ``(mode, point, interrupt)``: every point in both modes, the exception alternating so that each
#: point and each mode meets both a ``RuntimeError`` and a ``KeyboardInterrupt`` (8 steps, not 16:
#: the property tests draw the other combinations)
FAULT_CASES = [(mode, point, (i + j) % 2 == 1)
               for j, mode in enumerate(("cached", "cached_loss"))
               for i, point in enumerate(FAULT_POINTS)]


@st.composite
def problem_specs(draw: Any, features: frozenset, *, dropout: bool = False,
                  max_batch: int = 13) -> ProblemSpec:
    """Hypothesis strategy over the contract problem, limited to what the harness supports."""
    groups = draw(st.integers(1, 3))
    batch_sizes = tuple(draw(st.integers(1, max_batch)) for _ in range(groups))
    if draw(st.booleans()):
        chunk_sizes = (draw(st.integers(1, max(batch_sizes) + 2)),) * groups
    else:
        chunk_sizes = tuple(draw(st.integers(1, size + 2)) for size in batch_sizes)
    dtypes = ["float64"] + (["float32"] if "float32" in features else [])
    return ProblemSpec(
        batch_sizes=batch_sizes,
        chunk_sizes=chunk_sizes,
        dim_in=draw(st.integers(1, 4)),
        dim_out=draw(st.integers(1, 5)),
        shared_encoder=("separate_encoders" not in features) or draw(st.booleans()),
        nested_input="nested_input" in features and draw(st.booleans()),
        nested_output="nested_output" in features and draw(st.booleans()),
        dropout=draw(st.sampled_from([0.25, 0.5])) if dropout else 0.0,
        learnable_scale="learnable_scale" in features and draw(st.booleans()),
        dtype=draw(st.sampled_from(dtypes)),
        seed=draw(st.integers(0, 2**16)),
    )


_SETTINGS: dict[str, Any] = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                      HealthCheck.function_scoped_fixture,
                                                      HealthCheck.differing_executors])


class BackendContract:
    """Subclass with ``harness = YourHarness()`` (class name starting with ``Test``) to run the suite.

    ``max_examples`` bounds each property test; lower it for backends that compile per shape.
    ``examples_for`` lowers it further for named tests (``{"test_...": 6}``).
    """

    harness: Harness
    max_examples: int = 40
    examples_for: dict = {}

    @classmethod
    def _features(cls) -> frozenset:
        return cls.harness.features

    def _property(self, strategy: Any, test_name: str, max_examples: int | None = None) -> Any:
        """Decorates a check as a hypothesis test bounded by this backend's example budget."""
        limit = min(max_examples or self.max_examples,
                    self.examples_for.get(test_name, self.max_examples))

        def decorate(check: Any) -> Any:
            return settings(max_examples=examples(limit), **_SETTINGS)(given(strategy)(check))
        return decorate

    # -- exactness ------------------------------------------------------------------------------------
    def test_cached_equals_full_batch(self) -> None:
        @self._property(problem_specs(self._features()), "test_cached_equals_full_batch")
        def check(spec: ProblemSpec) -> None:
            cached = self.harness.run(spec, "cached")
            full = self.harness.run(spec, "full")
            assert_results_close(cached, full, spec.dtype)
        check()

    def test_dropout_replays_the_chunked_reference(self) -> None:
        if "dropout" not in self._features():
            pytest.skip(f"{self.harness.name} harness has no dropout")

        @self._property(problem_specs(self._features(), dropout=True),
                        "test_dropout_replays_the_chunked_reference")
        def check(spec: ProblemSpec) -> None:
            cached = self.harness.run(spec, "cached")
            chunked = self.harness.run(spec, "chunked")
            assert_results_close(cached, chunked, spec.dtype)
            if "rng_state" in self._features():
                assert np.array_equal(np.asarray(cached.rng_after), np.asarray(chunked.rng_after)), (
                    "the step left the random state elsewhere than a chunk-by-chunk forward")
        check()

    def test_dropout_really_draws_masks(self) -> None:
        # Guards the test above against passing vacuously: with dropout, the gradients differ
        # from those without.
        if "dropout" not in self._features():
            pytest.skip(f"{self.harness.name} harness has no dropout")
        spec = ProblemSpec(batch_sizes=(8, 8), chunk_sizes=(3, 3), dropout=0.5, dim_in=4)
        a = self.harness.run(spec, "cached")
        b = self.harness.run(ProblemSpec(**{**spec.__dict__, "dropout": 0.0}), "full")
        assert relative_error(a.grads["enc0.W"], b.grads["enc0.W"]) > 1e-6

    def test_cached_loss_equals_full_batch(self) -> None:
        # the framework's autodiff drives pass 2: a scaled loss plus another term, as trainers do
        if "cached_loss" not in self._features():
            pytest.skip(f"{self.harness.name} harness has no cached_loss")

        @st.composite
        def scaled_specs(draw: Any) -> ProblemSpec:
            spec = draw(problem_specs(self._features()))
            upstream = draw(st.sampled_from([1.0, 0.5, -1.5, 3.0, 1 / 3, 1024.0]))
            return ProblemSpec(**{**spec.__dict__, "upstream": upstream,
                                  "extra_term": draw(st.booleans())})

        @self._property(scaled_specs(), "test_cached_loss_equals_full_batch")
        def check(spec: ProblemSpec) -> None:
            cached = self.harness.run(spec, "cached_loss")
            full = self.harness.run(spec, "full")
            assert_results_close(cached, full, spec.dtype)
        check()

    def test_cached_loss_replays_dropout(self) -> None:
        if "cached_loss" not in self._features() or "dropout" not in self._features():
            pytest.skip(f"{self.harness.name} harness has no cached_loss with dropout")

        @self._property(problem_specs(self._features(), dropout=True),
                        "test_cached_loss_replays_dropout", max(5, self.max_examples // 3))
        def check(spec: ProblemSpec) -> None:
            assert_results_close(self.harness.run(spec, "cached_loss"),
                                 self.harness.run(spec, "chunked"), spec.dtype)
        check()

    # -- nothing half-done ----------------------------------------------------------------------------
    def test_failure_leaves_gradients_untouched(self) -> None:
        @st.composite
        def failing_specs(draw: Any) -> tuple[ProblemSpec, Fault]:
            spec = draw(problem_specs(self._features()))
            return spec, draw(faults(spec, encoder_calls(self.harness, spec)))

        @self._property(failing_specs(), "test_failure_leaves_gradients_untouched",
                        max(4, self.max_examples // 4))
        def check(case: tuple[ProblemSpec, Fault]) -> None:
            _check_failure(self.harness, *case, "cached")
        check()

    def test_cached_loss_failure_leaves_gradients_untouched(self) -> None:
        if "cached_loss" not in self._features():
            pytest.skip(f"{self.harness.name} harness has no cached_loss")

        @st.composite
        def failing_specs(draw: Any) -> tuple[ProblemSpec, Fault]:
            spec = draw(problem_specs(self._features()))
            return spec, draw(faults(spec, encoder_calls(self.harness, spec)))

        @self._property(failing_specs(), "test_cached_loss_failure_leaves_gradients_untouched",
                        max(4, self.max_examples // 4))
        def check(case: tuple[ProblemSpec, Fault]) -> None:
            _check_failure(self.harness, *case, "cached_loss")
        check()

    @pytest.mark.parametrize(("mode", "point", "interrupt"), FAULT_CASES,
                             ids=[f"{m}-{p}-{'KeyboardInterrupt' if i else 'RuntimeError'}"
                                  for m, p, i in FAULT_CASES])
    def test_every_fault_point_leaves_state_untouched(self, mode: str, point: str,
                                                      interrupt: bool) -> None:
        # every point of a step, deterministically, on one small problem (two groups, a short
        # last chunk, separate encoders and a loss-owned scale where the harness has them)
        if mode == "cached_loss" and "cached_loss" not in self._features():
            pytest.skip(f"{self.harness.name} harness has no cached_loss")
        features = self._features()
        spec = ProblemSpec(batch_sizes=(3, 2), chunk_sizes=(2, 2), dim_in=3, dim_out=2,
                           shared_encoder="separate_encoders" not in features,
                           learnable_scale="learnable_scale" in features)
        _check_failure(self.harness, spec, fault_at(point, spec.num_chunks, interrupt,
                                                     encoder_calls(self.harness, spec)), mode)

    # -- errors -----------------------------------------------------------------------------------------
    def _pair(self, rows: tuple[int, ...] = (4, 4), dim: int = 3) -> tuple:
        rng = np.random.default_rng(0)
        return tuple(self.harness.tensor(rng.normal(size=(r, dim))) for r in rows)

    @pytest.mark.parametrize("chunk_size", [0, -1, 2.5, True, "4", None])
    def test_bad_chunk_size(self, chunk_size: Any) -> None:
        with pytest.raises(GradCacheError, match="chunk_size"):
            self.harness.step(self.harness.encoder(3, 2), self._pair(), self.harness.loss(),
                              chunk_size=chunk_size)

    def test_wrong_number_of_chunk_sizes(self) -> None:
        with pytest.raises(GradCacheError, match="3 chunk sizes for 2 input groups"):
            self.harness.step(self.harness.encoder(3, 2), self._pair(), self.harness.loss(),
                              chunk_size=[1, 2, 3])

    def test_wrong_number_of_encoders(self) -> None:
        encoders = [self.harness.encoder(3, 2) for _ in range(3)]
        with pytest.raises(GradCacheError, match="3 encoders for 2 input groups"):
            self.harness.step(encoders, self._pair(), self.harness.loss(), chunk_size=2)

    def test_empty_group(self) -> None:
        with pytest.raises(GradCacheError, match="group 1 is empty"):
            self.harness.step(self.harness.encoder(3, 2), self._pair((4, 0)), self.harness.loss(),
                              chunk_size=2)

    def test_leaves_with_different_batch_sizes(self) -> None:
        a, b = self._pair((4, 5))
        with pytest.raises(GradCacheError, match=r"group 0.*disagree.*x: \(4, 3\).*y: \(5, 3\)"):
            self.harness.step(self.harness.encoder(3, 2), ({"x": a, "y": b},), self.harness.loss(),
                              chunk_size=2)

    def test_inputs_not_a_sequence_of_groups(self) -> None:
        (a,) = self._pair((4,))
        with pytest.raises(GradCacheError, match="list or tuple of input groups"):
            self.harness.step(self.harness.encoder(3, 2), a, self.harness.loss(), chunk_size=2)

    def test_loss_not_scalar(self) -> None:
        with pytest.raises(GradCacheError, match="scalar"):
            self.harness.step(self.harness.encoder(3, 2), self._pair(), self.harness.loss("vector"),
                              chunk_size=2)

    def test_encoder_returning_wrong_rows(self) -> None:
        encoder = self.harness.encoder(3, 2, rows_kept=1)
        with pytest.raises(GradCacheError, match=r"group 0, chunk 0.*has 2 rows"):
            self.harness.step(encoder, self._pair(), self.harness.loss(), chunk_size=2)

    # -- errors: bad input that once ran (or failed late, or without saying where) --------------------
    # Each case is refused with a GradCacheError naming the cause before pass 1 (or, for an error
    # of the user's own loss, keeps its type and gains a note saying it came from the loss).
    def _bad_input_step(self, loss_fn: Any = "default", **options: Any) -> Any:
        loss = self.harness.loss() if loss_fn == "default" else loss_fn
        return self.harness.step(self.harness.encoder(3, 2), self._pair(), loss, chunk_size=2,
                                 **options)

    @pytest.mark.parametrize("split, total", [
        (lambda group, size: [group[:1]], "1 = 1 rows"),                   # rows dropped
        (lambda group, size: [group, group[:2]], "4 \\+ 2 = 6 rows"),     # rows duplicated
    ], ids=["drops", "duplicates"])
    def test_bad_input_split_fn_must_keep_every_row(self, split: Any, total: str) -> None:
        with pytest.raises(GradCacheError, match=f"split_fn cut group 0 of 4 rows into chunks of "
                                                 f"{total}; it must put every row"):
            self._bad_input_step(split_fn=split)

    @pytest.mark.parametrize("loss_fn", [None, "not a function", 3])
    def test_bad_input_loss_fn_must_be_callable(self, loss_fn: Any) -> None:
        with pytest.raises(GradCacheError, match="loss_fn must be callable"):
            self._bad_input_step(loss_fn)

    @pytest.mark.parametrize("options, message", [
        (dict(loss_kwargs=[1.0]), "loss_kwargs must be a mapping"),
        (dict(loss_kwargs={0: 1.0}), "loss_kwargs .* keys must be strings; got 0"),
        (dict(determinism_tolerance="abc"), "determinism_tolerance must be a finite number"),
        (dict(determinism_tolerance=-1, check_determinism=True),
         "determinism_tolerance must be a finite number >= 0, got -1"),
        (dict(check_finite="yes"), "check_finite must be True or False"),
        (dict(split_fn="halves"), "split_fn must be callable"),
    ], ids=["loss_kwargs-list", "loss_kwargs-key", "tolerance-str", "tolerance-negative",
            "check_finite-str", "split_fn-str"])
    def test_bad_input_option_values_name_the_option(self, options: dict, message: str) -> None:
        with pytest.raises(GradCacheError, match=message):
            self._bad_input_step(**options)

    def test_bad_input_an_error_in_the_loss_says_it_came_from_the_loss(self) -> None:
        with pytest.raises(ValueError, match="no such label") as raised:
            self._bad_input_step(_RaisingLoss())
        _assert_noted(raised.value, "raised in loss_fn on the full batch, with representations "
                                    "of group 0 (4, 2), group 1 (4, 2)")

    def test_bad_input_per_row_loss_kwargs_of_another_length_show_in_the_note(self) -> None:
        # the core cannot tell a per-row tensor from any other (a class weight, a vector of k
        # negatives): it checks no lengths, but the loss's own error names the shapes
        labels = self.harness.tensor(np.arange(3))
        with pytest.raises(ValueError, match="labels of 3 rows for 4") as raised:
            self._bad_input_step(_labelled(self.harness.loss()), loss_kwargs={"labels": labels})
        _assert_noted(raised.value, "group 1 (4, 2) and loss_kwargs labels: (3,)")


def _assert_noted(error: BaseException, text: str) -> None:
    """``error`` carries a gradcache note containing ``text`` -- unless TensorFlow's autograph
    re-created it (it then carries ``ag_error_metadata``): an error raised while a ``tf.function``
    is traced is replaced at the function's boundary by a new one of the same builtin type, with
    the user-code traceback in its message and without the original's notes, whoever added them."""
    if hasattr(error, "ag_error_metadata"):
        assert "in user code" in str(error), str(error)
        return
    notes = "\n".join(getattr(error, "__notes__", []))
    assert text in notes, notes


class _RaisingLoss:
    """A loss that fails as a user's loss may (called, or asked for its value and gradient)."""

    def __call__(self, *reps: Any, **kwargs: Any) -> Any:
        raise ValueError("no such label")

    value_and_grad = __call__


def _labelled(loss: Any) -> Any:
    """``loss`` taking per-row ``labels``, raising as a framework does on a length mismatch."""
    def check(reps: tuple, labels: Any) -> None:
        rows, given = tuple(reps[0].shape)[0], tuple(labels.shape)[0]
        if rows != given:
            raise ValueError(f"labels of {given} rows for {rows} rows of scores")

    def labelled(*reps: Any, labels: Any) -> Any:
        check(reps, labels)
        return loss(*reps)

    if callable(getattr(loss, "value_and_grad", None)):   # the numpy harness's losses
        def value_and_grad(*reps: Any, labels: Any) -> Any:
            check(reps, labels)
            return loss.value_and_grad(*reps)
        labelled.value_and_grad = value_and_grad  # type: ignore[attr-defined]
    return labelled
