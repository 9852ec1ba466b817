"""``cached_step`` for TensorFlow and Keras: the public entry point, returning ``(loss, grads)``.

It finds the variables to differentiate and the random generators to replay, builds a
:class:`~gradcache_tf._backend.TFBackend` for the step and runs the core's schedule. Gradients are
returned aligned with the variables, ready for ``optimizer.apply_gradients``; nothing is written
anywhere, so a step that raises leaves nothing behind. It runs eagerly and inside ``tf.function``
(with or without ``jit_compile=True``); AutoGraph is kept out of it, since the schedule's Python
control flow is meant to run once, at trace time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import tensorflow as tf

from gradcache import Collective, GradCacheError, StepOptions, flatten, map_leaves, run_cached_step
from gradcache_tf import _rng
from gradcache_tf._backend import TFBackend, is_tensor
from gradcache_tf._distributed import ReplicaCollective

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from gradcache import StepKeywords


def _has_variables(obj: Any, attribute: str = "trainable_variables") -> bool:
    try:
        return isinstance(getattr(obj, attribute, None), (list, tuple))
    except Exception:  # noqa: BLE001 - e.g. a Keras property that needs a built layer
        return False


def _variables_of(obj: Any, attribute: str = "trainable_variables") -> list:
    """``obj.<attribute>`` (Keras layers and models, ``tf.Module``), else that attribute of the
    modules and the variables a plain callable reaches (closure cells, a bound ``self``, a
    partial's arguments, an object's attributes)."""
    def owns(item: Any) -> bool:
        return _has_variables(item, attribute)

    if owns(obj):
        return list(getattr(obj, attribute))
    found = []
    for item in _rng.walk_objects([obj], stop=owns, budget=5000):
        if item is not obj and owns(item):
            found.extend(getattr(item, attribute))
    # walk_objects skips bare variables (they are leaves); look for them one level down.
    for item in _rng._callable_referents(obj) + list(getattr(obj, "__dict__", {}).values()):
        if isinstance(item, tf.Variable) and (item.trainable or attribute == "variables"):
            found.append(item)
    return found


def _owners(encoders: Any, loss_fn: Any) -> list:
    encoder_list = list(encoders) if isinstance(encoders, (list, tuple)) else [encoders]
    owners = list({id(e): e for e in encoder_list}.values())
    return owners + ([loss_fn] if loss_fn is not None else [])


def _known_variable_ids(encoders: Any, loss_fn: Any) -> set[int]:
    """Every variable (trainable or frozen) found on the encoders and the loss: reading one of
    these is never a sign that the search missed something."""
    ids = set()
    for owner in _owners(encoders, loss_fn):
        for variable in _variables_of(owner, "variables"):
            try:
                ids.add(id(_rng.as_tf_variable(variable)))
            except GradCacheError:
                continue
    return ids


def trainable_variables(encoders: Any, loss_fn: Any = None) -> list:
    """The variables :func:`cached_step` differentiates by default, in the order of its ``grads``.

    The trainable variables of each distinct encoder in the order the groups use them, then those
    of the loss (a learnable temperature in a ``tf.Module`` or Keras layer), each variable once.
    An encoder or loss is searched through its ``trainable_variables`` (Keras layers and models,
    ``tf.Module``); a plain function through what it closes over (closure cells, a bound
    ``self``, a ``functools.partial``'s arguments), never through module globals. Call it after
    the first step for Keras models that are built lazily.

    >>> import tensorflow as tf
    >>> from gradcache_tf import trainable_variables
    >>> def make_encoder():
    ...     weight = tf.Variable(tf.ones((3, 2)))  # a closure cell: found
    ...     return lambda x: x @ weight
    >>> [v.shape.as_list() for v in trainable_variables(make_encoder())]
    [[3, 2]]
    """
    variables, seen = [], set()
    for owner in _owners(encoders, loss_fn):
        for variable in _variables_of(owner):
            key = id(_rng.as_tf_variable(variable))
            if key not in seen:
                seen.add(key)
                variables.append(variable)
    return variables


def _check_static_batch(inputs: Any) -> None:
    """Inside ``tf.function`` every input needs a static batch size: chunks are planned at trace
    time. Say so in TensorFlow's words rather than the core's generic message."""
    if tf.executing_eagerly() or not isinstance(inputs, (list, tuple)):
        return
    for group, tree in enumerate(inputs):
        leaves, _ = flatten(tree, is_tensor)
        for leaf in leaves:
            if leaf.shape.rank and leaf.shape[0] is None:
                raise GradCacheError(
                    f"input group {group} has a tensor of shape {leaf.shape} whose batch size "
                    f"(dimension 0) is unknown while tracing tf.function; chunks are planned at "
                    f"trace time, so give the batch a static size: an input_signature with a fixed "
                    f"batch size, a tf.data pipeline batched with drop_remainder=True, or (Keras "
                    f"fit with arrays) a batch_size that divides the number of rows")


@tf.autograph.experimental.do_not_convert
def cached_step(encoders: Any, inputs: Sequence, loss_fn: Callable, *,
                chunk_size: int | Sequence[int], variables: Sequence[Any] | Callable | None = None,
                training: bool | None = True, optimizer: Any = None,
                random_state: Sequence[Any] = (), check_random: bool = True,
                graph_loop: bool = True, **options: Unpack[StepKeywords]) -> tuple[tf.Tensor, list]:
    """One contrastive step over a batch larger than memory; returns ``(loss, grads)``.

    Same gradients as ``tape.gradient(loss_fn(*[get_rep(enc(x)) for enc, x in zip(encoders,
    inputs)]), variables)`` on the full batch -- with the same random masks as a chunk-by-chunk
    forward -- while holding only one chunk's activations at a time.

    Args:
        encoders: one encoder shared by every input group, or a sequence with one per group. A
            Keras layer or model is called Keras-style, ``enc(chunk, training=training)``, with the
            nested chunk as its one input; a ``tf.Module`` or plain callable as ``enc(x)`` for a
            tensor, ``enc(**x)`` for a mapping, ``enc(*x)`` for a list or tuple.
        inputs: a sequence of input groups, e.g. ``(queries, passages)``; every tensor leaf of a
            group is batched along dimension 0. Inside ``tf.function`` batch sizes must be static.
        loss_fn: ``loss_fn(*reps, **loss_kwargs)`` returning a scalar tensor; ``reps`` has one
            entry per group, structured as the encoder's output.
        chunk_size: rows per chunk, one int or one per group. It bounds memory only.
        variables: the variables to differentiate (``tf.Variable`` or Keras variables, or a
            callable returning them, called once after pass 1); ``grads`` is aligned with them.
            Default:
            :func:`trainable_variables` of the encoders and the loss, found after pass 1 (so lazily
            built Keras layers are included); the step then also checks that the encoders read no
            other trainable variable. Loss-owned variables get the loss's direct gradient once;
            a variable used by both an encoder and the loss gets both contributions.
        training: passed as ``training=`` to Keras encoders (default ``True``: a cached step is a
            training step, so dropout is on); ``None`` passes nothing.
        optimizer: a Keras optimizer whose ``scale_loss`` is applied before differentiating (a
            ``keras.optimizers.LossScaleOptimizer`` for ``mixed_float16``); ``grads`` then come
            back scaled, as that optimizer's ``apply_gradients`` expects. ``loss`` is unscaled.
        random_state: extra ``keras.random.SeedGenerator``, ``tf.random.Generator`` or state
            ``tf.Variable`` objects to replay, for generators that are not attributes of the
            encoders (those, and the global generators of Keras and TF, are found automatically).
        check_random: raise a ``GradCacheError`` when pass 1 uses randomness the replay cannot
            reproduce: a generator not found, or a legacy stateful op such as
            ``tf.random.uniform`` or ``tf.nn.dropout`` (see ``docs/tf.md``).
        graph_loop: inside ``tf.function``, iterate chunks with one ``tf.while_loop`` (the traced
            program does not grow with the number of chunks); ``False`` unrolls them.
        **options: the options every adapter shares (:class:`gradcache.StepOptions`):
            ``get_rep``, ``loss_kwargs``, ``split_fn`` (eager only in practice: its chunks are
            iterated in Python), ``pad_trim`` and ``sort_by_length`` (eagerly only: they read the
            attention masks, whose values a traced graph does not know), ``check_finite`` and
            ``check_determinism`` (inside ``tf.function`` they run on the host when the graph
            runs; not available under ``jit_compile=True``), ``determinism_tolerance``,
            ``progress`` (eager only), and ``distributed``, below.
        distributed: ``True``: this call is one replica's part of a step over the global batch: call it
            inside ``strategy.run`` (``tf.distribute.MirroredStrategy`` or
            ``MultiWorkerMirroredStrategy``), each replica with its own rows. The loss sees every
            replica's representations concatenated in replica order; ``loss`` is the global-batch
            loss on every replica, and ``grads`` are this replica's share: their sum over replicas
            -- what a Keras optimizer's ``apply_gradients`` takes in a replica context -- is
            exactly the gradient of one device running the global batch (a loss-owned variable's
            gradient is carried by replica 0 alone). Replicas may hold different numbers of rows.
            Default ``False``: a call inside ``strategy.run`` is a per-replica step, as before.
            A :class:`gradcache_tf.ReplicaCollective` is accepted too (to read what it moved), and
            any other :class:`gradcache.Collective` (your own transport): ``grads`` are then this
            rank's share, and summing them is yours (a loss-owned variable's gradient is the
            global one on every rank: count it once).

    Returns:
        ``(loss, grads)``: the scalar loss (no gradient attached) and a list with one gradient per
        variable (``None`` where a variable got no gradient).

    Raises:
        GradCacheError: for malformed input (before anything runs), randomness that cannot be
            replayed, a loss with no gradient path, or a failed check (inside ``tf.function``, a
            ``tf.errors.InvalidArgumentError`` carrying its message). No gradient is returned
            then, and the random streams are put back where they were before the step (inside
            ``tf.function``: for a failed check; an error raised by an op of your own at run
            time ends the graph where it stands). The gradients are first-order only: a
            recording tape that differentiates them raises ``LookupError``.

    >>> import tensorflow as tf
    >>> from gradcache_tf import cached_step
    >>> encoder = tf.keras.layers.Dense(4)
    >>> queries, passages = tf.random.normal((16, 8)), tf.random.normal((16, 8))
    >>> def info_nce(q, p):
    ...     scores = tf.matmul(q, p, transpose_b=True)
    ...     labels = tf.range(tf.shape(q)[0])
    ...     return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, scores))
    >>> loss, grads = cached_step(encoder, (queries, passages), info_nce, chunk_size=4)
    >>> [g.shape.as_list() for g in grads]
    [[8, 4], [4]]
    >>> _ = tf.keras.optimizers.SGD(0.1).apply_gradients(zip(grads, encoder.trainable_variables))
    """
    with errors_through_autograph():
        setup = Setup(encoders, inputs, loss_fn, options, entry="cached_step",
                      variables=variables, training=training, optimizer=optimizer,
                      random_state=random_state, check_random=check_random, graph_loop=graph_loop)
        loss, grads = run_cached_step(setup.backend, encoders, setup.inputs, loss_fn,
                                      chunk_size=chunk_size, collective=setup.collective,
                                      **setup.keywords)
        # TF tensors carry no graph, but a tape recording around the step saw the loss computed
        # from a loss's own variables: the loss is a value, as everywhere (its gradient is in grads)
        return tf.stop_gradient(loss), setup.backend.gradients_for_caller(grads)


@contextlib.contextmanager
def errors_through_autograph() -> Iterator[None]:
    """Lets a ``GradCacheError`` raised in the block out of AutoGraph as it is: inside a
    ``tf.function`` that AutoGraph converts, an exception type it does not know is re-raised as a
    ``StagingError``; this flag makes it let ours through unchanged."""
    try:
        yield
    except GradCacheError as error:
        error.ag_pass_through = True  # type: ignore[attr-defined]
        raise


class Setup:
    """What ``cached_step`` and ``cached_loss`` make of their arguments, in one place: the shared
    options parsed and checked (:class:`gradcache.StepOptions`, with TensorFlow's own listed in
    ``own``), the collective ``distributed=`` asks for, numpy input groups made tensors (and their
    batch sizes checked static inside ``tf.function``), and the step's :class:`TFBackend`."""

    own = ("variables", "training", "optimizer", "random_state", "check_random", "graph_loop")

    def __init__(self, encoders: Any, inputs: Any, loss_fn: Any, options: Any, *, entry: str,
                 variables: Any, training: Any, optimizer: Any, random_state: Any,
                 check_random: bool, graph_loop: bool):
        step = StepOptions.from_keywords(options, adapter="gradcache_tf", own=self.own,
                                         entry=entry)
        self.keywords = step.step_keywords()
        self.collective = _collective(step.distributed)
        self.inputs = as_tensors(inputs)
        _check_static_batch(self.inputs)
        self.backend = _backend_for(encoders, loss_fn, variables, training, optimizer,
                                    random_state, check_random, graph_loop, self.collective)


def as_tensors(inputs: Any) -> Any:
    """The input groups with every numpy array made a tensor (as the JAX adapter takes them)."""
    def convert(leaf: Any) -> Any:
        return tf.convert_to_tensor(leaf) if isinstance(leaf, np.ndarray) else leaf
    if not isinstance(inputs, (list, tuple)):
        return inputs   # the core words the error for a malformed batch
    return type(inputs)(map_leaves(convert, group, lambda v: is_tensor(v) or isinstance(
        v, np.ndarray)) for group in inputs)


def _backend_for(encoders: Any, loss_fn: Any, variables: Any, training: Any, optimizer: Any,
                 random_state: Any, check_random: bool, graph_loop: bool,
                 collective: Collective | None) -> TFBackend:
    """The backend of one step (``cached_step``) or one forward and backward (``cached_loss``)."""
    encoder_list = list(encoders) if isinstance(encoders, (list, tuple)) else [encoders]
    if variables is None:
        def found() -> list:
            return trainable_variables(encoder_list, loss_fn)
        source: Any = found
    else:
        source = variables if callable(variables) else list(variables)
    loss_scale = None
    if optimizer is not None:
        loss_scale = getattr(optimizer, "scale_loss", None)
        if not callable(loss_scale):
            raise GradCacheError(f"optimizer must be a Keras optimizer with scale_loss(), got "
                                 f"{type(optimizer).__name__}")
    random = _rng.RandomSources.find(encoder_list + [loss_fn], random_state)
    check_variables = None
    if variables is None:
        def check_variables() -> set[int]:
            return _known_variable_ids(encoder_list, loss_fn)
    return TFBackend(source, random=random, training=training, loss_scale=loss_scale,
                     check_random=check_random, check_variables=check_variables,
                     graph_loop=graph_loop, loss_grad_weight=_first_replica_only(collective))


def _collective(distributed: Any) -> Collective | None:
    """The replicas' collective a ``distributed=`` argument asks for (``True``: the current
    ``tf.distribute`` replica context's), or ``None`` for a one-replica step."""
    if distributed is False or distributed is None:
        return None
    if distributed is True:
        return ReplicaCollective()
    if isinstance(distributed, Collective):   # ReplicaCollective, or a transport of your own
        return distributed
    raise GradCacheError(
        f"distributed= takes False, True (the replica context of the tf.distribute strategy the "
        f"step runs in) or a gradcache.Collective (gradcache_tf.ReplicaCollective), got "
        f"{distributed!r}")


def _first_replica_only(collective: Collective | None) -> Any:
    """1 on replica 0 and 0 elsewhere (``None`` outside a distributed step with several replicas):
    every replica computes the same global-batch gradient for a loss-owned variable, and the
    optimizer sums the replicas' gradients, so only one replica may contribute it. With a
    collective of the caller's own, every rank keeps the global gradient, as on the other
    adapters (what the caller sums is the encoders' shares)."""
    if collective is None or collective.world_size == 1 or not isinstance(collective,
                                                                          ReplicaCollective):
        return None
    first = collective.is_first()
    return float(first) if isinstance(first, bool) else tf.cast(first, tf.float32)
