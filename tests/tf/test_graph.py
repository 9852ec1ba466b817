"""Graph mode: ``tf.function`` with and without XLA, the ``tf.while_loop`` chunk loop, no retracing
per chunk, static batch sizes, the host checks, and error types surviving AutoGraph."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import gradcache_tf
from gradcache import GradCacheError
from gradcache.testing.contract import ProblemSpec, relative_error
from tests.tf.harness import ContractLoss, ContractModule


def _problem(batch: int = 24, dtype: str = "float64", dropout: float = 0.0) -> tuple:
    spec = ProblemSpec(batch_sizes=(batch, batch), chunk_sizes=(4, 4), dim_in=3, dim_out=5,
                       dropout=dropout, dtype=dtype)
    arrays = spec.arrays()
    generator = tf.random.Generator.from_seed(7)
    encoder = ContractModule(arrays["params"]["enc0.W"], arrays["params"]["enc0.b"], spec, generator)
    inputs = [tf.constant(x) for x in arrays["inputs"]]
    return encoder, inputs, ContractLoss(arrays["scale"], spec), generator


def _full_batch(encoder, inputs, loss_fn) -> tuple:
    variables = gradcache_tf.trainable_variables(encoder, loss_fn)
    with tf.GradientTape() as tape:
        loss = loss_fn(*[encoder(x) for x in inputs])
    return loss, tape.gradient(loss, variables)


class CountingEncoder(tf.Module):
    """Counts its Python calls: while tracing, that is how many copies the graph holds."""

    def __init__(self, inner: tf.Module):
        super().__init__()
        self.inner = inner
        self.calls = 0

    def __call__(self, x):
        self.calls += 1
        return self.inner(x)


@pytest.mark.parametrize("jit_compile", [False, True])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_tf_function_equals_full_batch(jit_compile: bool, dtype: str) -> None:
    encoder, inputs, loss_fn, _ = _problem(dtype=dtype)
    step = tf.function(lambda q, p: gradcache_tf.cached_step(encoder, (q, p), loss_fn, chunk_size=4),
                       jit_compile=jit_compile)
    loss, grads = step(*inputs)
    expected_loss, expected = _full_batch(encoder, inputs, loss_fn)
    tolerance = 1e-10 if dtype == "float64" else 1e-5
    assert relative_error(loss.numpy(), expected_loss.numpy()) <= tolerance
    for got, want in zip(grads, expected, strict=True):
        assert relative_error(got.numpy(), want.numpy()) <= tolerance


@pytest.mark.parametrize("jit_compile", [False, True])
def test_chunk_loop_does_not_unroll(jit_compile: bool) -> None:
    # 6 and 12 uniform chunks per group: the traced program is the same size, with the encoder
    # traced three times per group and pass (chunk 0, the loop body, the remainder).
    sizes = {}
    for batch in (26, 50):
        encoder, inputs, loss_fn, _ = _problem(batch=batch)
        counting = CountingEncoder(encoder)
        step = tf.function(lambda q, p, counting=counting, loss_fn=loss_fn: gradcache_tf.cached_step(
            counting, (q, p), loss_fn, chunk_size=4), jit_compile=jit_compile)
        concrete = step.get_concrete_function(*inputs)
        sizes[batch] = (counting.calls, len(concrete.graph.as_graph_def().node))
        loss, _ = step(*inputs)  # runs without another trace
        assert step.experimental_get_tracing_count() == 1
        assert np.isfinite(loss.numpy())
    assert sizes[26] == sizes[50]
    assert sizes[26][0] == 2 * 2 * 3  # groups x passes x (first, loop body, remainder)


def test_graph_loop_off_unrolls() -> None:
    encoder, inputs, loss_fn, _ = _problem(batch=24)
    counting = CountingEncoder(encoder)
    step = tf.function(lambda q, p: gradcache_tf.cached_step(counting, (q, p), loss_fn, chunk_size=4,
                                                             graph_loop=False))
    loss, grads = step(*inputs)
    assert counting.calls == 2 * 2 * 6
    expected_loss, expected = _full_batch(encoder, inputs, loss_fn)
    for got, want in zip(grads, expected, strict=True):
        assert relative_error(got.numpy(), want.numpy()) <= 1e-10


def test_no_retrace_on_new_data() -> None:
    encoder, inputs, loss_fn, _ = _problem()
    step = tf.function(lambda q, p: gradcache_tf.cached_step(encoder, (q, p), loss_fn, chunk_size=4))
    step(*inputs)
    step(inputs[1], inputs[0])
    assert step.experimental_get_tracing_count() == 1


def test_dropout_in_the_loop_replays_and_advances_once() -> None:
    # A chunk-by-chunk reference in the same compiled mode draws the same masks, and the stream
    # ends where that reference leaves it (pass 2 replays without advancing it).
    encoder, inputs, loss_fn, generator = _problem(batch=20, dropout=0.5)
    start = generator.state.numpy().copy()
    step = tf.function(lambda q, p: gradcache_tf.cached_step(encoder, (q, p), loss_fn, chunk_size=4))
    _, grads = step(*inputs)
    after_cached = generator.state.numpy().copy()
    generator.reset_from_seed(7)
    assert np.array_equal(generator.state.numpy(), start)
    variables = gradcache_tf.trainable_variables(encoder, loss_fn)

    @tf.function
    def reference(q, p):
        with tf.GradientTape() as tape:
            reps = [tf.concat([encoder(x[i:i + 4]) for i in range(0, 20, 4)], 0) for x in (q, p)]
            loss = loss_fn(*reps)
        return tape.gradient(loss, variables)

    expected = reference(*inputs)
    assert np.array_equal(generator.state.numpy(), after_cached)
    for got, want in zip(grads, expected, strict=True):
        assert relative_error(got.numpy(), want.numpy()) <= 1e-10


def test_unknown_batch_size_is_named() -> None:
    encoder, inputs, loss_fn, _ = _problem()
    spec = tf.TensorSpec([None, 3], tf.float64)
    step = tf.function(lambda q, p: gradcache_tf.cached_step(encoder, (q, p), loss_fn, chunk_size=4),
                       input_signature=[spec, spec])
    with pytest.raises(GradCacheError, match="unknown while tracing.*drop_remainder=True"):
        step(*inputs)


def test_error_type_survives_autograph() -> None:
    encoder, inputs, loss_fn, _ = _problem()

    @tf.function  # AutoGraph converts this body; our error must still be a GradCacheError
    def step(q, p):
        return gradcache_tf.cached_step(encoder, (q, p), loss_fn, chunk_size=0)

    with pytest.raises(GradCacheError, match="chunk_size"):
        step(*inputs)


def test_check_finite_in_graph_and_xla() -> None:
    encoder, inputs, _, _ = _problem()

    def bad_loss(q, p):
        return tf.reduce_sum(q) * np.inf

    step = tf.function(lambda q, p: gradcache_tf.cached_step(encoder, (q, p), bad_loss, chunk_size=4,
                                                             check_finite=True))
    with pytest.raises(tf.errors.InvalidArgumentError, match="not finite"):
        step(*inputs)
    with pytest.raises(GradCacheError, match="not finite"):
        gradcache_tf.cached_step(encoder, inputs, bad_loss, chunk_size=4, check_finite=True)
    compiled = tf.function(step.python_function, jit_compile=True)
    with pytest.raises(GradCacheError, match="jit_compile"):
        compiled(*inputs)


def test_xla_on_cpu_warns_about_keras_random_in_the_loop(keras) -> None:
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dropout(0.5, seed=1),
                              keras.layers.Dense(2)])
    inputs = [tf.random.stateless_normal((12, 3), (s, 0)) for s in (1, 2)]
    fast = tf.function(lambda q, p: gradcache_tf.cached_step(model, (q, p), _mean_dot, chunk_size=3,
                                                             graph_loop=False), jit_compile=True)
    slow = tf.function(lambda q, p: gradcache_tf.cached_step(model, (q, p), _mean_dot, chunk_size=3),
                       jit_compile=True)
    if tf.config.list_logical_devices("GPU"):
        pytest.skip("the warning concerns XLA on CPU")
    with pytest.warns(RuntimeWarning, match="graph_loop=False"):
        slow.get_concrete_function(*inputs)
    _, grads = fast(*inputs)  # unrolled: no warning, same kind of result
    assert all(g is not None for g in grads)


def _mean_dot(q, p):
    return tf.reduce_mean(tf.matmul(q, p, transpose_b=True))


class MarkingEncoder(tf.Module):
    """``x @ W`` whose graph names where each call's forward starts and its backward ends.

    Call ``n``'s input passes through an op named ``forward_call{n}``; the gradient of ``W`` it
    produces passes through one named ``backward_call{n}`` (only pass 2's calls have one).
    """

    def __init__(self):
        super().__init__()
        self.w = tf.Variable(tf.reshape(tf.range(15, dtype=tf.float64), (3, 5)) / 10.0)
        self.calls = 0

    def __call__(self, x):
        self.calls += 1
        call = self.calls

        @tf.custom_gradient
        def marked(w):
            return tf.identity(w), lambda dw: tf.identity(dw, name=f"backward_call{call}")

        return tf.tanh(tf.identity(x, name=f"forward_call{call}") @ marked(self.w))


def _ancestors(graph_def, name: str) -> set[str]:
    """Every node ``name`` depends on, through data and control edges."""
    inputs = {node.name: [i.lstrip("^").split(":")[0] for i in node.input] for node in graph_def.node}
    seen, todo = set(), [name]
    while todo:
        for parent in inputs[todo.pop()]:
            if parent not in seen:
                seen.add(parent)
                todo.append(parent)
    return seen


@pytest.mark.parametrize("batch", [4, 8, 10])  # 1 chunk, 2 chunks, 2 chunks and a shorter one
def test_chunks_run_by_themselves_hold_one_chunks_activations(batch: int) -> None:
    # Pass 2's chunks outside the tf.while_loop are separate subgraphs: unless each chunk's
    # forward depends on the previous chunk's backward, the executor may run both forwards first
    # and hold two chunks' activations (at two chunks, as much as the full-batch step).
    encoder = MarkingEncoder()
    rows = tf.reshape(tf.range(batch * 3, dtype=tf.float64), (batch, 3)) / 30.0
    step = tf.function(lambda q, p: gradcache_tf.cached_step(encoder, (q, p), _mean_dot, chunk_size=4))
    graph_def = step.get_concrete_function(rows, rows[::-1]).graph.as_graph_def()
    marks: dict[str, dict[int, str]] = {"forward": {}, "backward": {}}
    for node in graph_def.node:
        kind, _, call = node.name.rpartition("/")[2].partition("_call")
        if kind in marks and call.isdigit():
            marks[kind][int(call)] = node.name
    pass2 = sorted(marks["backward"])
    assert len(pass2) == 2 * -(-batch // 4)  # every chunk of both towers, none in a loop
    for before, after in zip(pass2, pass2[1:]):
        assert marks["backward"][before] in _ancestors(graph_def, marks["forward"][after]), (
            f"pass 2's call {after} may start before call {before}'s backward is done")
    _, grads = step(rows, rows[::-1])
    assert np.all(np.isfinite(grads[0].numpy()))


# -- progress ---------------------------------------------------------------------------------------
class RecordingBar:
    """Stands in for tqdm: records what the core reports."""

    made: list = []

    def __init__(self, total: int, **_: object):
        self.total, self.count = total, 0
        RecordingBar.made.append(self)

    def set_description(self, text: str, refresh: bool = True) -> None:
        pass

    def update(self, n: int) -> None:
        self.count += n

    def close(self) -> None:
        pass


def test_progress_follows_an_eager_step_and_is_off_inside_tf_function(monkeypatch) -> None:
    """The core shows a bar only where the backend reads the inputs' values (``to_host``):
    eagerly, not while ``tf.function`` traces the step (the bar would count the trace)."""
    tqdm_auto = pytest.importorskip("tqdm.auto")
    monkeypatch.setattr(tqdm_auto, "tqdm", RecordingBar)
    RecordingBar.made = []
    encoder, inputs, loss_fn, _ = _problem(batch=8)
    gradcache_tf.cached_step(encoder, inputs, loss_fn, chunk_size=4, progress=True)
    (bar,) = RecordingBar.made
    assert bar.total == bar.count == 8   # 2 chunks x 2 groups x 2 passes
    RecordingBar.made = []
    step = tf.function(lambda q, p: gradcache_tf.cached_step(encoder, (q, p), loss_fn, chunk_size=4,
                                                             progress=True))
    step(*inputs)
    assert RecordingBar.made == []


def test_the_backend_defaults_read_tf_tensors() -> None:
    """``shape`` and ``differentiable`` are the core's defaults on TensorFlow: they must agree
    with TensorFlow's own notions, for every dtype and for a graph tensor of unknown rank."""
    from types import SimpleNamespace

    backend = gradcache_tf.TFBackend([], random=gradcache_tf.RandomSources([]))
    dtypes = {value for value in vars(tf.dtypes).values() if isinstance(value, tf.DType)}
    assert len(dtypes) > 15
    for dtype in dtypes:
        assert backend.differentiable(SimpleNamespace(dtype=dtype)) == (
            dtype.is_floating or dtype.is_complex), dtype
    assert backend.differentiable(tf.zeros(2, tf.bfloat16))
    assert not backend.differentiable(tf.zeros(2, tf.int32))
    shapes = []

    @tf.function(input_signature=[tf.TensorSpec(None, tf.float32), tf.TensorSpec([None, 3])])
    def traced(unknown_rank, unknown_rows):
        shapes.extend([backend.shape(unknown_rank), backend.shape(unknown_rows)])
        return unknown_rows

    traced(tf.zeros(2), tf.zeros((2, 3)))
    assert shapes == [(None,), (None, 3)]
    assert backend.shape(tf.zeros((4, 3))) == (4, 3) and backend.shape(tf.constant(1.0)) == ()
