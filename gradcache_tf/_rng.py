"""Random state for TensorFlow: find the generators an encoder draws from, snapshot and replay them.

TensorFlow and Keras 3 keep randomness that can be replayed in *variables*: a Keras
``SeedGenerator`` holds its seed in ``.state`` (Dropout, GaussianNoise, the ``keras.random`` ops
given ``seed=generator``, and the global generator behind ``seed=None``), and a
``tf.random.Generator`` holds its counter in ``.state``. A :class:`RandomSources` is the list of
those variables for one step; a record is their values before a chunk, and replaying a record
assigns them, runs the chunk, and assigns back the values found on entry, so that pass 2 never
advances a stream. Reads and assignments are ordinary resource-variable ops, so the same code runs
eagerly, inside ``tf.function`` and under XLA.

:class:`UsageGuard` watches pass 1 for randomness this cannot replay -- a generator that was not
found on the encoder, or a legacy stateful op (``tf.random.uniform``, ``tf.nn.dropout``) whose
hidden per-op counter nobody can rewind -- and turns it into a :class:`GradCacheError` instead of
silently wrong gradients. It must never change what the encoder computes.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import threading
import types
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import tensorflow as tf

from gradcache import GradCacheError

#: Legacy stateful random ops: their state lives inside the op kernel (seeded from the global and
#: op seeds) and advances on every run; there is no variable to snapshot, so they cannot be replayed.
LEGACY_RANDOM_OPS = frozenset({
    "RandomUniform", "RandomUniformInt", "RandomStandardNormal", "TruncatedNormal",
    "ParameterizedTruncatedNormal", "RandomShuffle", "RandomShuffleQueueV2", "Multinomial",
    "RandomGamma", "RandomGammaGrad", "RandomPoisson", "RandomPoissonV2", "RandomCrop",
    "RandomBinomial", "NonDeterministicInts", "RandomIndexShuffle",
})


def keras_module() -> Any:
    """The ``keras`` module when it is already imported and runs on TensorFlow, else ``None``.

    Like the dispatcher, this never imports Keras itself: a user without Keras pays nothing.
    """
    keras = sys.modules.get("keras")
    if keras is None:
        return None
    try:
        return keras if keras.backend.backend() == "tensorflow" else None
    except Exception:  # noqa: BLE001 - a half-imported or exotic keras: behave as if absent
        return None


def _seed_generator_class() -> type | None:
    keras = keras_module()
    return getattr(getattr(keras, "random", None), "SeedGenerator", None) if keras else None


def _layer_class() -> type[Any] | None:
    keras = keras_module()
    return getattr(getattr(keras, "layers", None), "Layer", None) if keras else None


def as_tf_variable(variable: Any) -> tf.Variable:
    """The ``tf.Variable`` behind a TF or Keras 3 variable (Keras wraps one in ``.value``)."""
    if isinstance(variable, tf.Variable):
        return variable
    inner = getattr(variable, "value", None)
    if isinstance(inner, tf.Variable):
        return inner
    raise GradCacheError(f"expected a tf.Variable or a Keras variable, got {type(variable).__name__}")


def _safe_getattr(obj: Any, name: str) -> Any:
    # Objects with a custom __getattr__ may raise anything, or build something; treat as absent.
    try:
        return getattr(obj, name, None)
    except Exception:  # noqa: BLE001
        return None


def _callable_referents(fn: Any) -> list:
    """What a plain callable closes over: cells, a bound ``self``, a partial's parts, a wrapped fn."""
    found: list = []
    if isinstance(fn, functools.partial):
        found += [fn.func, *fn.args, *fn.keywords.values()]
    for name in ("__self__", "__wrapped__", "python_function", "_python_function", "__func__"):
        value = _safe_getattr(fn, name)
        if value is not None and not isinstance(value, types.ModuleType):
            found.append(value)
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            found.append(cell.cell_contents)
        except ValueError:  # an empty cell
            continue
    return found


_SKIP_TYPES = (str, bytes, int, float, complex, bool, type, types.ModuleType, tf.Tensor,
               tf.Variable, tf.TensorShape, tf.DType)


def walk_objects(roots: Iterable[Any], *, stop: Any = None, budget: int = 20000) -> Iterator[Any]:
    """Objects reachable from ``roots`` through attributes, containers and closures.

    ``stop(obj)`` true means "yield it but do not look inside". Bounded by ``budget`` objects so
    that a huge user object graph costs a fixed amount of time.
    """
    seen: set[int] = set()
    stack = list(roots)[::-1]
    while stack and budget > 0:
        obj = stack.pop()
        if obj is None or id(obj) in seen or isinstance(obj, _SKIP_TYPES):
            continue
        if type(obj).__module__ == "numpy":
            continue
        seen.add(id(obj))
        budget -= 1
        yield obj
        if stop is not None and stop(obj):
            continue
        if isinstance(obj, Mapping):
            children = list(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            children = list(obj)
        elif isinstance(obj, (types.FunctionType, types.MethodType, functools.partial)) or (
                callable(obj) and not hasattr(obj, "__dict__")):
            children = _callable_referents(obj)
        else:
            children = list(getattr(obj, "__dict__", {}).values()) + _callable_referents(obj)
        stack.extend(reversed(children))


def _random_owners(objects: Iterable[Any]) -> list:
    """Keras SeedGenerators and tf.random.Generators reachable from ``objects``, each once."""
    seed_class = _seed_generator_class()
    owners_types = (tf.random.Generator,) + ((seed_class,) if seed_class else ())

    def stop(obj: Any) -> bool:
        return isinstance(obj, owners_types)

    found, ids = [], set()
    for obj in walk_objects(objects, stop=stop):
        if isinstance(obj, owners_types) and id(obj) not in ids:
            ids.add(id(obj))
            found.append(obj)
        # Keras tracks a layer's seed generators itself; ask it too (cheap, and covers layers the
        # attribute walk reaches only through Keras' private trackers).
        generators = _safe_getattr(obj, "_seed_generators")
        for generator in generators if isinstance(generators, (list, tuple)) else ():
            if id(generator) not in ids:
                ids.add(id(generator))
                found.append(generator)
    return found


def _global_generators() -> list:
    """The Keras global SeedGenerator and TF's global tf.random.Generator, created if missing.

    Unseeded ``keras.random`` ops and ``tf.random.get_global_generator()`` draw from these. They
    are created lazily by their frameworks; creating them here (outside any graph, via
    ``init_scope``) means a first use inside the step is a use of a generator already snapshotted.
    """
    found = []
    with tf.init_scope():
        try:
            found.append(tf.random.get_global_generator())
        except RuntimeError:  # op determinism is on and no global generator was set: none to use
            pass
        if keras_module() is not None:
            try:
                from keras.src.random.seed_generator import global_seed_generator
                found.append(global_seed_generator())
            except Exception:  # noqa: BLE001 - a Keras without the private helper: skip it
                pass
    return found


def _state_variable(owner: Any) -> tf.Variable:
    return as_tf_variable(owner.state)


class RandomSources:
    """The random-state variables a step snapshots before each chunk and replays in pass 2.

    >>> import tensorflow as tf
    >>> generator = tf.random.Generator.from_seed(0)
    >>> sources = RandomSources([generator])
    >>> record = sources.capture()
    >>> first = generator.normal([2])
    >>> with sources.replay(record):
    ...     again = generator.normal([2])
    >>> bool(tf.reduce_all(first == again)), bool(tf.reduce_all(generator.state == record[-1]))
    (True, False)
    """

    def __init__(self, owners: Iterable[Any]):
        self.owners: list = []
        self.variables: list[tf.Variable] = []
        ids: set[int] = set()
        for owner in owners:
            variable = owner if isinstance(owner, tf.Variable) else _state_variable(owner)
            if id(variable) in ids:
                continue
            ids.add(id(variable))
            self.owners.append(owner)
            self.variables.append(variable)
        self.owner_ids = {id(owner) for owner in self.owners}

    @classmethod
    def find(cls, objects: Iterable[Any], extra: Iterable[Any] = ()) -> RandomSources:
        """Sources reachable from ``objects``, the global generators, and ``extra`` (user given)."""
        extra = list(extra or ())
        for item in extra:
            if not isinstance(item, (tf.Variable, tf.random.Generator)) and not hasattr(item, "state"):
                raise GradCacheError(
                    f"random_state entries must be keras.random.SeedGenerator, tf.random.Generator "
                    f"or tf.Variable, got {type(item).__name__}")
        return cls(_random_owners(list(objects)) + _global_generators() + extra)

    def capture(self) -> tuple:
        """The current values of every state variable (a tuple of tensors; empty if none)."""
        return tuple(variable.read_value() for variable in self.variables)

    def restore(self, values: tuple) -> None:
        for variable, value in zip(self.variables, values, strict=True):
            variable.assign(value)

    @contextlib.contextmanager
    def replay(self, record: tuple) -> Iterator[None]:
        """Runs the block with the streams at ``record``, then puts back the values found on entry."""
        if not self.variables:
            yield
            return
        current = self.capture()
        self.restore(record)
        try:
            yield
        finally:
            self.restore(current)


class UsageGuard:
    """Watches an encoder call for randomness that :class:`RandomSources` cannot replay.

    While active (on the calling thread only) it notes every Keras ``SeedGenerator.next`` and every
    ``tf.random.Generator`` state access, and every legacy stateful random op executed eagerly or
    added to a graph. :meth:`check` then raises a :class:`GradCacheError` naming the culprit.
    """

    def __init__(self, sources: RandomSources):
        self.sources = sources
        self.untracked: dict[int, Any] = {}
        self.legacy_ops: list[str] = []
        self.keras_draws = 0  # SeedGenerator draws seen (stateless ops with a traced seed)
        self._thread = threading.get_ident()

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        patches = []
        seed_class = _seed_generator_class()
        if seed_class is not None:
            patches.append(self._patch(seed_class, "next", self._wrap_method))
        patches.append(self._patch(tf.random.Generator, "state", self._wrap_property))
        callbacks = _op_callbacks()
        if callbacks is not None:
            callbacks.add_op_callback(self._on_op)
        try:
            yield
        finally:
            if callbacks is not None:
                callbacks.remove_op_callback(self._on_op)
            for owner, name, original in reversed(patches):
                setattr(owner, name, original)

    def _note(self, generator: Any) -> None:
        if threading.get_ident() == self._thread and id(generator) not in self.sources.owner_ids:
            self.untracked.setdefault(id(generator), generator)

    def _patch(self, owner: type, name: str, wrap: Any) -> tuple:
        original = owner.__dict__[name]
        setattr(owner, name, wrap(original))
        return owner, name, original

    def _wrap_method(self, original: Any) -> Any:
        guard = self

        @functools.wraps(original)
        def next_seed(generator: Any, *args: Any, **kwargs: Any) -> Any:
            guard._note(generator)
            guard.keras_draws += 1
            return original(generator, *args, **kwargs)
        return next_seed

    def _wrap_property(self, original: property) -> property:
        guard = self

        def state(generator: Any) -> Any:
            guard._note(generator)
            return original.fget(generator) if original.fget is not None else None
        return property(state, original.fset, original.fdel, original.__doc__)

    def _on_op(self, op_type: str, inputs: Any, attrs: Any, outputs: Any, op_name: Any = None,
               graph: Any = None) -> None:
        if op_type in LEGACY_RANDOM_OPS and threading.get_ident() == self._thread:
            self.legacy_ops.append(f"{op_type}" + (f" ('{op_name}')" if op_name else ""))
        return None

    def check(self) -> None:
        if self.legacy_ops:
            ops = ", ".join(sorted(set(self.legacy_ops)))
            raise GradCacheError(
                f"the encoder ran the stateful random op(s) {ops}, whose state lives inside the op "
                f"and cannot be replayed in pass 2 (tf.random.uniform/normal, tf.nn.dropout, "
                f"tf.image.random_*, ...). Draw from a keras.random.SeedGenerator, a "
                f"tf.random.Generator or a tf.random.stateless_* op instead (Keras layers such as "
                f"Dropout already do). If the op does not change the representation (or you accept "
                f"different masks), pass check_random=False; check_determinism=True then verifies "
                f"that pass 2 reproduces pass 1")
        if self.untracked:
            names = ", ".join(_describe(g) for g in self.untracked.values())
            raise GradCacheError(
                f"the encoder draws from random generator(s) gradcache did not find on it: {names}. "
                f"Their state could not be snapshotted, so pass 2 would see other random masks. "
                f"Make the generator an attribute of the encoder (a Keras layer or tf.Module, or a "
                f"variable a plain function closes over), or pass it with random_state=[...]")


def _describe(generator: Any) -> str:
    name = getattr(generator, "name", None)
    return f"{type(generator).__name__}" + (f" '{name}'" if name else "")


def _op_callbacks() -> Any:
    """TensorFlow's op-callback registry (private but stable since TF 2.2), or None if it moved."""
    try:
        from tensorflow.python.framework import op_callbacks
    except ImportError:  # pragma: no cover - a TensorFlow without it: legacy ops go unnoticed
        return None
    return op_callbacks if hasattr(op_callbacks, "add_op_callback") else None
