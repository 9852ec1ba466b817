"""The TensorFlow backend: the core's primitives over ``tf.GradientTape``, gradients returned.

Pass 1 calls the encoder with no tape (TensorFlow records nothing then) and cuts the outputs off
with ``stop_gradient``; the loss's gradient with respect to the full-batch representations comes
from one tape over the loss; pass 2 re-encodes each chunk under a fresh tape and pulls the cached
slice back with ``tape.gradient(reps, variables, output_gradients=...)``, adding into an
accumulator that the step returns. Random state is snapshotted and replayed through
:mod:`gradcache_tf._rng`.

Inside ``tf.function`` the full chunks of a group are iterated by one ``tf.while_loop`` (see
:meth:`TFBackend.loop_equal_chunks`; the core runs a shorter last chunk by itself), so the traced
program holds a fixed number of copies of the encoder whatever the number of chunks. Chunks run
by themselves (fewer than three, a shorter last one, ``graph_loop=False``) are ordered by a control
dependency instead: each chunk's pass-2 forward waits for the previous chunk's backward, so memory
holds one chunk's activations at a time there too (see :func:`_after`). No control
flow of the algorithm lives here: the loop primitive runs whatever body the core hands it, and the
core writes the loss's and the pullback's skeletons around this module's tape.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import tensorflow as tf
from tensorflow.python.eager import record as _record  # stop_recording (private, stable)
from tensorflow.python.ops import control_flow_util  # XLA context detection (private, stable)

from gradcache import Backend, GradCacheError, call_with_convention, flatten, unflatten
from gradcache_tf import _rng


def is_tensor(value: Any) -> bool:
    """Tensor leaves of nested inputs and outputs: eager or symbolic ``tf.Tensor``s and variables."""
    return isinstance(value, (tf.Tensor, tf.Variable))


def _differentiable(tensor: Any) -> bool:
    return tensor.dtype.is_floating or tensor.dtype.is_complex


def _add(total: tf.Tensor, gradient: Any) -> tf.Tensor:
    """``total + gradient``. An embedding lookup's gradient is ``IndexedSlices``: scatter-add its
    rows, so that a chunk costs its own rows, not a pass over the whole (vocabulary-sized) table."""
    if isinstance(gradient, tf.IndexedSlices):
        rows = tf.expand_dims(tf.cast(gradient.indices, tf.int64), -1)
        return tf.tensor_scatter_nd_add(total, rows, tf.cast(gradient.values, total.dtype))
    return total + tf.cast(gradient, total.dtype)


def _weighted(gradient: Any, weight: Any) -> Any:
    """``gradient * weight`` for a dense or an ``IndexedSlices`` gradient."""
    if isinstance(gradient, tf.IndexedSlices):
        values = gradient.values * tf.cast(weight, gradient.values.dtype)
        return tf.IndexedSlices(values, gradient.indices, gradient.dense_shape)
    gradient = tf.convert_to_tensor(gradient)
    return gradient * tf.cast(weight, gradient.dtype)


SECOND_ORDER = (
    "gradcache gives first-order gradients only: pass 1 runs with no tape recording, so a "
    "gradient of the cached gradient (a gradient penalty, a nested GradientTape) would miss every "
    "term through the representations. Compute that term without gradient caching")


def first_order_only(gradients: list, variables: list) -> list:
    """``gradients`` (one per variable), made to raise if a recording tape differentiates them.

    An outer tape records pass 2 but not pass 1, so its gradient of these would miss every term
    through the representations -- silently, or as ``None`` where a gradient exists (a linear
    encoder's gradient does not depend on its own weights). Each gradient is therefore joined to
    its variable through ``PreventGradient`` (an identity whose gradient raises ``LookupError``
    with :data:`SECOND_ORDER`), in a ``tf.where`` that keeps the gradient's values exactly.
    Without a recording tape they are returned as they are.
    """
    if not _record.could_possibly_record():
        return gradients
    out: list = []
    for gradient, variable in zip(gradients, variables, strict=True):
        if gradient is None:
            out.append(None)
            continue
        prevented = tf.raw_ops.PreventGradient(input=gradient, message=SECOND_ORDER)
        reached = tf.raw_ops.PreventGradient(input=tf.cast(variable, gradient.dtype),
                                             message=SECOND_ORDER)
        out.append(tf.where(tf.zeros_like(gradient, tf.bool), reached, prevented))
    return out


class TFBackend(Backend):
    """Primitives over ``tf.GradientTape``. One instance serves one step.

    Args:
        variables: the variables to differentiate (``tf.Variable`` or Keras variables), or a
            callable returning them, called once pass 1 has run (so lazily built Keras layers
            exist by then).
        random: the :class:`~gradcache_tf._rng.RandomSources` to snapshot and replay.
        training: passed as ``training=`` to Keras layers and models (``None``: not passed).
        loss_scale: ``loss -> scaled loss`` (a ``LossScaleOptimizer``'s ``scale_loss``).
        check_random: raise on randomness the replay cannot reproduce (see ``UsageGuard``).
        check_variables: when the variables were found automatically, a callable returning the
            ids of every variable (frozen ones too) found on the encoders and the loss; pass 2
            then raises if an encoder reads a trainable variable outside that set (one the search
            missed, such as a global). ``None``: no check.
        graph_loop: iterate chunks with ``tf.while_loop`` inside ``tf.function``.
        loss_grad_weight: ``None``, or a scalar (a Python number or a tensor) multiplying the
            gradient the loss gives variables directly (a learnable temperature). A distributed
            step passes 1 on replica 0 and 0 elsewhere: every replica computes the same global-batch
            loss gradient, and the optimizer sums the replicas' gradients.
    """

    name = "tf"
    # no distributed wrapper synchronises on a last chunk (tf.distribute reduces in the optimizer),
    # so that chunk may stay in the while-loop (one copy of the encoder fewer in the graph)
    reads_final_use = False

    def __init__(self, variables: Sequence[Any] | Callable[[], Sequence[Any]], *,
                 random: _rng.RandomSources, training: bool | None = True,
                 loss_scale: Callable | None = None, check_random: bool = True,
                 check_variables: Callable[[], set[int]] | None = None, graph_loop: bool = True,
                 loss_grad_weight: Any = None):
        self._variables_source = variables
        self.random = random
        self.training = training
        self.loss_scale = loss_scale
        self.check_random = check_random
        self.check_variables = check_variables
        self.graph_loop = graph_loop
        self.loss_grad_weight = loss_grad_weight
        self.variables: list | None = None        # as the caller knows them (Keras or TF)
        self.tf_variables: list[tf.Variable] = []  # unique tf.Variables, in first-seen order
        self.slots: list[int] = []                 # variables[i] -> tf_variables[slots[i]]
        self.touched: set[int] = set()             # slots that received a gradient
        self._known: set[int] | None = None        # ids of all variables found (for the check)
        self._warned = False
        self._keras_draws = 0
        # inside tf.function: the random streams' values a failed check puts back (see transaction)
        self._restore_point: tuple | None = None

    # -- variables ----------------------------------------------------------------------------------
    def resolve_variables(self) -> None:
        if self.variables is not None:
            return
        source = self._variables_source
        variables = list(source() if callable(source) else source)
        if not variables:
            raise GradCacheError(
                "found no trainable variables on the encoders or the loss; pass variables=[...] "
                "(the variables to differentiate, e.g. model.trainable_variables)")
        index: dict[int, int] = {}
        for variable in variables:
            tf_variable = _rng.as_tf_variable(variable)
            if id(tf_variable) not in index:
                index[id(tf_variable)] = len(self.tf_variables)
                self.tf_variables.append(tf_variable)
            self.slots.append(index[id(tf_variable)])
        self.variables = variables

    def gradients_for_caller(self, grads: list) -> list:
        """The accumulator as a list aligned with the caller's variables; ``None`` where the step
        gave a variable no gradient at all (as ``GradientTape.gradient`` would)."""
        return first_order_only([grads[slot] if slot in self.touched else None
                                 for slot in self.slots],
                                [self.tf_variables[slot] for slot in self.slots])

    # -- tensors ------------------------------------------------------------------------------------
    def is_leaf(self, value: Any) -> bool:
        return is_tensor(value)

    def concat_rows(self, leaves: Sequence[Any]) -> Any:
        return tf.concat(list(leaves), axis=0)

    # -- randomness ---------------------------------------------------------------------------------
    def rng_capture(self, group: int, chunk: Any) -> tuple:
        return self.random.capture()

    def rng_replay(self, record: tuple) -> contextlib.AbstractContextManager:
        return self.random.replay(record)

    # -- autodiff -----------------------------------------------------------------------------------
    def _call(self, encoder: Any, chunk: Any) -> Any:
        layer_class = _rng._layer_class()
        if layer_class is not None and isinstance(encoder, layer_class):
            # Keras convention: the nested chunk is the single `inputs` argument.
            options = {} if self.training is None else {"training": self.training}
            return encoder(chunk, **options)
        return call_with_convention(encoder, chunk, is_tensor)

    def encode(self, encoder: Any, chunk: Any, record: Any, get_rep: Callable) -> Any:
        # no tape records pass 1: not the caller's around cached_loss, whose gradient is pass 2's
        with _record.stop_recording():
            if self.check_random:
                guard = _rng.UsageGuard(self.random)
                with guard.watching():
                    rep = get_rep(self._call(encoder, chunk))
                guard.check()
                self._keras_draws += guard.keras_draws
            else:
                rep = get_rep(self._call(encoder, chunk))
        leaves, spec = flatten(rep, is_tensor)
        return unflatten(spec, [tf.stop_gradient(leaf) for leaf in leaves])

    def _warn_slow_xla_random(self) -> None:
        # Measured (TF 2.21, CPU): XLA runs stateless random ops whose seed is traced -- what every
        # Keras SeedGenerator draw becomes -- some 30x slower inside a while-loop body than outside.
        if (not self._keras_draws or self._warned or tf.executing_eagerly()
                or tf.config.list_logical_devices("GPU")
                or not control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())):
            return
        self._warned = True
        warnings.warn(
            "gradcache: under jit_compile=True on CPU, XLA draws Keras random numbers (dropout) "
            "slowly inside the tf.while_loop over chunks; graph_loop=False unrolls the chunks "
            "instead (faster steps, compile time growing with the number of chunks), or draw from a "
            "tf.random.Generator", RuntimeWarning, stacklevel=2)

    def zero_grads(self) -> list:
        # The core asks after pass 1, which may have built lazily built Keras layers: only then
        # are their variables known.
        self.resolve_variables()
        return [tf.zeros(v.shape, v.dtype) for v in self.tf_variables]

    def _accumulate(self, grads: list, new: Sequence[Any]) -> list:
        out = list(grads)
        for slot, gradient in enumerate(new):
            if gradient is not None:
                self.touched.add(slot)
                out[slot] = _add(out[slot], gradient)
        return out

    def multiply(self, leaf: Any, factor: Any) -> Any:
        # the factor in the leaf's dtype, the product in float32 at least (a float16 gradient
        # times 1 / loss_scale would round the factor to a subnormal)
        if leaf.dtype in (tf.float16, tf.bfloat16):
            return tf.cast(tf.cast(leaf, tf.float32) * tf.cast(factor, tf.float32), leaf.dtype)
        return leaf * tf.cast(factor, leaf.dtype)

    def trains(self, encoder: Any) -> bool:
        """False for a Keras layer or model (built) or a ``tf.Module`` that has variables, none of
        them trainable (``layer.trainable = False``: a frozen tower, encoded once and skipped in
        pass 2). An unbuilt Keras layer has no variables yet, a wrapper with none of its own may
        read someone else's, and a plain callable's are not known: those are assumed to train."""
        layer_class = _rng._layer_class()
        owns = (layer_class is not None and isinstance(encoder, layer_class)
                and encoder.built) or isinstance(encoder, tf.Module)
        if not owns:
            return True
        return bool(encoder.trainable_variables) or not encoder.variables

    def zeros_like(self, leaf: Any) -> Any:
        return tf.zeros_like(leaf)

    def scale_loss(self, value: Any) -> Any:
        # the optimizer's scale as a factor in the value's own dtype: a loss, or a gradient a loss
        # supplies (a float16 gradient stays float16)
        if self.loss_scale is None:
            return value
        return value * tf.cast(self.loss_scale(tf.ones((), value.dtype)), value.dtype)

    def value_and_grad(self, fn: Callable, values: list, grads: Any) -> tuple[Any, list, Any]:
        watched = [tf.identity(value) for value in values]  # fresh tensors the tape can watch
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(watched)
            tape.watch([v for v in self.tf_variables if _differentiable(v)])
            target, value = fn(watched)
        gradients = tape.gradient(target, watched + self.tf_variables)
        if all(gradient is None for gradient in gradients):
            # as tape.gradient of the full-batch loss would (None for every variable): zeros in
            # its place would look like a trained step
            raise GradCacheError(
                "the loss does not depend on the representations (no gradient reaches them: does "
                "it stop_gradient them, or compute its value through integer ops such as argmax, "
                "a comparison or a cast to an integer type?)")
        value_grads = [None if g is None else tf.convert_to_tensor(g)
                       for g in gradients[:len(watched)]]
        direct = gradients[len(watched):]
        if self.loss_grad_weight is not None:
            direct = [None if g is None else _weighted(g, self.loss_grad_weight) for g in direct]
        return value, value_grads, self._accumulate(grads, direct)

    def vjp(self, encoder: Any, chunk: Any, record: Any, outputs: Callable, grads: Any, *,
            final_use: bool) -> tuple[list, Any]:
        del final_use  # see reads_final_use
        chunk = _after(grads, chunk)
        with tf.GradientTape(watch_accessed_variables=self.check_variables is not None) as tape:
            tape.watch([v for v in self.tf_variables if _differentiable(v)])
            leaves, cotangents = outputs(self._call(encoder, chunk))
        pairs = [(r, tf.cast(g, r.dtype)) for r, g in zip(leaves, cotangents) if g is not None]
        if self.check_variables is not None:
            self._check_watched(tape, self.check_variables)
        gradients = tape.gradient([r for r, _ in pairs], self.tf_variables,
                                  output_gradients=[g for _, g in pairs])
        return leaves, self._accumulate(grads, gradients)

    def _check_watched(self, tape: tf.GradientTape,
                       check_variables: Callable[[], set[int]]) -> None:
        if self._known is None:
            self._known = check_variables() | {id(v) for v in self.tf_variables}
        missed = [v for v in tape.watched_variables() if id(v) not in self._known and v.trainable]
        if missed:
            names = ", ".join(sorted({v.name for v in missed}))
            raise GradCacheError(
                f"the encoder reads trainable variables that were not found on the encoders or the "
                f"loss: {names}. Pass variables=[...] listing every variable to differentiate")

    # -- nothing half-done --------------------------------------------------------------------------
    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        # Gradients are returned, so a failed step has nothing to undo there; what it did change is
        # the random streams pass 1 advanced. Eagerly, put them back on the way out. Inside
        # tf.function an exception here is a failed trace, which runs nothing; what fails when
        # the graph runs is a host check, whose failure branch (run_check) assigns the streams
        # these reads saw -- the graph orders the reads before pass 1's draws and the branch
        # after them, as it orders every access to one variable in program order.
        before = self.random.capture()
        outer, self._restore_point = self._restore_point, None
        if not tf.executing_eagerly():
            self._restore_point = before
        try:
            yield
        except BaseException:
            if tf.executing_eagerly():
                self.random.restore(before)
            raise
        finally:
            self._restore_point = outer

    # -- checks -------------------------------------------------------------------------------------
    def run_check(self, check: Callable[..., None], *values: Any) -> None:
        """Eagerly: runs ``check`` now. Inside ``tf.function``: runs it on the host when the graph
        runs (``tf.py_function``), so that the step fails with the check's message and returns
        nothing. XLA cannot call the host (and drops assertions), so there it is refused."""
        if tf.executing_eagerly():
            check(*values)
            return
        if control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()):
            raise GradCacheError(
                "check_finite and check_determinism run on the host, which a jit_compile=True "
                "function cannot call; run the checking step without jit_compile")
        leaves, spec = flatten(values, is_tensor)
        failures: list[BaseException] = []

        def on_host(*concrete: Any) -> bool:
            plain = [int(t) if t.shape.rank == 0 and t.dtype.is_integer else t for t in concrete]
            try:
                check(*unflatten(spec, plain))
            except GradCacheError as error:
                failures[:] = [error]
                return True
            return False

        def reraise() -> list:
            raise failures[0]

        # A failure first puts the random streams back where the transaction found them (an
        # eager step does that on its way out), then fails the graph with the check's message.
        restore_to = self._restore_point

        def fail() -> tf.Tensor:
            restored = [] if restore_to is None else [
                variable.assign(value) for variable, value in zip(self.random.variables, restore_to,
                                                                  strict=True)]
            with tf.control_dependencies(restored):
                tf.py_function(reraise, [], Tout=[], name="gradcache_check_failed")
            return tf.constant(True)

        failed = tf.py_function(on_host, leaves, Tout=tf.bool, name="gradcache_check")
        tf.cond(tf.reshape(failed, []), fail, lambda: tf.constant(False))

    def to_host(self, leaf: Any) -> Any:
        # inside tf.function a tensor is symbolic: its values exist only when the graph runs
        if not hasattr(leaf, "numpy"):          # already host values (numpy), or not a tensor
            return leaf if not tf.is_tensor(leaf) else None
        return leaf.numpy() if tf.executing_eagerly() else None

    def take_rows(self, leaf: Any, index: Any) -> Any:
        return tf.gather(leaf, index)

    # -- iteration ----------------------------------------------------------------------------------
    def loop_equal_chunks(self, body: Callable, carry: list, rows: list, count: int, size: int,
                          items: list | None) -> tuple[list, list, list] | None:
        """A ``tf.while_loop`` over ``count`` chunks of ``size`` rows inside ``tf.function``.

        Chunk 0 is traced on its own before the loop: that fixes the dtypes and shapes of what
        the body returns (the loop's ``TensorArray``s need them), lets lazily built Keras layers
        create their variables outside the loop, and gives any trace-time error a plain chunk
        number. Then one ``tf.while_loop`` (``parallel_iterations=1``, so chunks run one after the
        other and memory holds one chunk's activations) covers chunks ``1..count-1``. With the
        core's shorter last chunk, the program holds at most three copies of the body, whatever
        the number of chunks. Eagerly, or with fewer than three chunks, it declines: the core's
        chunk-by-chunk loop is as good (:meth:`vjp` orders those chunks, see :func:`_after`).
        """
        if not self.graph_loop or tf.executing_eagerly() or count < 3:
            return None

        def chunk_at(index: Any) -> list:
            if isinstance(index, int):
                return [leaf[index * size:(index + 1) * size] for leaf in rows]
            return [_rows_at(leaf, index * size, size) for leaf in rows]

        def item_at(index: Any) -> list:
            return [] if items is None else [leaf[index] for leaf in items]

        carry, out0, item0 = body(carry, 0, chunk_at(0), item_at(0))
        self._warn_slow_xla_random()  # pass 1's chunk 0 has shown whether the encoder draws
        arrays = [_array(leaf, count) for leaf in out0 + item0]

        def loop_body(index: tf.Tensor, carry: list, arrays: list) -> tuple:
            carry, out, item = body(carry, index, chunk_at(index), item_at(index))
            written = [array.write(index, leaf) for array, leaf in zip(arrays, out + item, strict=True)]
            return index + 1, carry, written

        _, carry, arrays = tf.while_loop(
            lambda index, *_: index < count, loop_body, (tf.constant(1), carry, arrays),
            parallel_iterations=1, maximum_iterations=count - 1)
        stacked = [array.stack() for array in arrays]
        rows_out = [_merge_leading(s, count * size) for s in stacked[:len(out0)]]
        return list(carry), rows_out, stacked[len(out0):]


def _after(grads: Sequence[Any], chunk: Any) -> Any:
    """``chunk``, but inside ``tf.function`` only once the gradients ``grads`` add up are computed.

    Pass 2's chunks run one by one outside the ``tf.while_loop`` (a group of one or two chunks,
    a shorter last chunk, ``graph_loop=False``, a ``split_fn``): nothing else orders chunk ``i +
    1``'s forward after chunk ``i``'s backward, and TensorFlow's executor runs ready ops as it
    likes, so it may hold both chunks' activations at once -- with two chunks, as much as the
    full-batch step. (Chunk 0, traced before the loop, and the loop's first chunk are such a pair
    too.) The accumulated gradients are the previous chunk's backward: a control dependency on them
    keeps one chunk's activations alive at a time. Eagerly, ops run in order.
    """
    if tf.executing_eagerly():
        return chunk
    done = [g for g in grads if isinstance(g, tf.Tensor)]
    if not done:
        return chunk
    leaves, spec = flatten(chunk, is_tensor)
    with tf.control_dependencies(done):
        return unflatten(spec, [tf.identity(leaf) if isinstance(leaf, tf.Tensor) else leaf
                                for leaf in leaves])


def _rows_at(leaf: tf.Tensor, start: tf.Tensor, size: int) -> tf.Tensor:
    """``leaf[start:start + size]`` with a traced ``start`` and a static result shape."""
    rank = leaf.shape.rank
    begin = tf.concat([tf.reshape(tf.cast(start, tf.int32), [1]), tf.zeros([rank - 1], tf.int32)], 0)
    return tf.slice(leaf, begin, [size] + [-1] * (rank - 1))


def _merge_leading(stacked: tf.Tensor, rows: int) -> tf.Tensor:
    """``(chunks, chunk_size, ...) -> (rows, ...)``, keeping the static shape where it is known."""
    tail = stacked.shape[2:]
    if tail.is_fully_defined():
        return tf.reshape(stacked, [rows, *tail.as_list()])
    merged = tf.reshape(stacked, tf.concat([[rows], tf.shape(stacked)[2:]], 0))
    return tf.ensure_shape(merged, [rows, *tail.as_list()])


def _array(leaf: tf.Tensor, count: int) -> tf.TensorArray:
    array = tf.TensorArray(leaf.dtype, size=count, element_shape=leaf.shape)
    return array.write(0, leaf)
