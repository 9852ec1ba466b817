"""A complete backend in plain numpy, with hand-written gradients, for a linear encoder.

It exists for two reasons: it is the worked example of ``docs/extending.md`` (everything a new
adapter must provide, in about a hundred lines), and it lets the core's schedule be tested with no
framework installed. It supports encoders that expose ``__call__(x)`` and ``vjp(x, rep_grad)`` and
losses that supply their own gradient; it is not meant for training real models.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from gradcache._backend import Backend
from gradcache._errors import GradCacheError


class LinearEncoder:
    """``rep = dropout(x) @ weight``, with its vector-Jacobian product written by hand.

    Dropout draws its mask from ``rng`` (a ``numpy.random.Generator``), so its randomness is a
    stream the backend must replay for pass 2 to see the same mask.

    >>> encoder = LinearEncoder(np.eye(2))
    >>> encoder(np.array([[1.0, 2.0]]))
    array([[1., 2.]])
    """

    def __init__(self, weight: np.ndarray, *, dropout: float = 0.0,
                 rng: np.random.Generator | None = None):
        if dropout and rng is None:
            raise ValueError("dropout needs a numpy Generator")
        self.weight = np.asarray(weight)
        self.dropout = dropout
        self.rng = rng

    def _dropped(self, x: np.ndarray) -> np.ndarray:
        if not self.dropout:
            return x
        assert self.rng is not None  # __init__ requires one with dropout
        keep = self.rng.random(x.shape) >= self.dropout
        return x * keep / (1.0 - self.dropout)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self._dropped(x) @ self.weight

    def vjp(self, x: np.ndarray, rep_grad: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Returns ``(rep, {"weight": d<rep_grad, rep>/dweight})``, drawing the same randomness as
        ``__call__``."""
        dropped = self._dropped(x)
        return dropped @ self.weight, {"weight": dropped.T @ rep_grad}


class NumpyInfoNCE:
    """InfoNCE of the first group against the rows of every group, with a hand-written gradient.

    ``scores = scale * reps[0] @ concat(reps).T``; row ``i``'s positive is column ``i``. It couples
    every row of every group, which is what makes a full-batch gradient necessary.

    >>> loss = NumpyInfoNCE(scale=2.0)
    >>> value, grads = loss.value_and_grad(np.eye(2), np.eye(2))
    >>> [g.shape for g in grads]
    [(2, 2), (2, 2)]
    """

    def __init__(self, scale: float = 1.0):
        self.scale = scale

    def __call__(self, *reps: np.ndarray) -> np.ndarray:
        return self.value_and_grad(*reps)[0]

    def value_and_grad(self, *reps: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        anchors = reps[0]
        everything = np.concatenate(reps, axis=0)
        rows = anchors.shape[0]
        scores = self.scale * anchors @ everything.T
        shifted = scores - scores.max(axis=1, keepdims=True)
        log_norm = np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        log_probs = shifted - log_norm
        loss = -np.mean(log_probs[np.arange(rows), np.arange(rows)])
        dscores = np.exp(log_probs)
        dscores[np.arange(rows), np.arange(rows)] -= 1.0
        dscores /= rows
        d_anchors = self.scale * dscores @ everything
        d_everything = self.scale * dscores.T @ anchors
        offsets = np.cumsum([0] + [r.shape[0] for r in reps])
        grads = [d_everything[a:b].copy() for a, b in zip(offsets[:-1], offsets[1:])]
        grads[0] += d_anchors
        return np.asarray(loss), grads


class NumpyBackend(Backend):
    """The numpy backend: arrays are leaves; gradients are a dict ``{id(encoder): {name: array}}``.

    Encoders provide ``vjp(x, rep_grad) -> (rep, {param_name: grad})``.

    ``rng`` is the generator whose state is captured per chunk in pass 1 and replayed in pass 2
    (the one the encoders' dropout draws from).
    """

    name = "numpy"

    def __init__(self, rng: np.random.Generator | None = None):
        self.rng = rng

    # tensors
    def is_leaf(self, value: Any) -> bool:
        return isinstance(value, (np.ndarray, np.generic))

    def shape(self, leaf: Any) -> tuple:
        return tuple(np.shape(leaf))

    def concat_rows(self, leaves: Sequence[Any]) -> Any:
        return np.concatenate(list(leaves), axis=0)

    # randomness: a Generator's state is a plain dict we can copy and restore
    def rng_capture(self, group: int, chunk: Any) -> Any:
        return None if self.rng is None else self.rng.bit_generator.state

    @contextlib.contextmanager
    def rng_replay(self, record: Any) -> Iterator[None]:
        if self.rng is None:
            yield
            return
        current = self.rng.bit_generator.state
        self.rng.bit_generator.state = record
        try:
            yield
        finally:
            self.rng.bit_generator.state = current

    # autodiff, by hand
    def encode(self, encoder: Any, chunk: Any, record: Any, get_rep: Any) -> Any:
        return get_rep(encoder(chunk))

    def value_and_grad(self, fn: Any, values: list, grads: Any) -> tuple[Any, list, Any]:
        # only losses with value_and_grad(*reps), which the core takes as they are, reach here
        # without raising: numpy cannot differentiate a function
        raise GradCacheError("the numpy backend needs a loss with value_and_grad(*reps)")

    def trains(self, encoder: Any) -> bool:
        # an encoder marked ``trainable = False`` is a frozen tower
        return bool(getattr(encoder, "trainable", True))

    def vjp(self, encoder: Any, chunk: Any, record: Any, outputs: Any, grads: Any, *,
            final_use: bool) -> tuple[list, Any]:
        if not hasattr(encoder, "vjp"):
            raise GradCacheError(f"the numpy backend needs encoders with vjp(); got {encoder!r}")
        # A hand-written vjp needs its cotangent before it runs: one forward (already under the
        # replayed stream) gives the outputs and their cotangents, then the vjp replays again.
        leaves, cotangents = outputs(encoder(chunk))
        if len(leaves) != 1:
            raise GradCacheError("the numpy backend's encoders return one array")
        with self.rng_replay(record):
            _, param_grads = encoder.vjp(chunk, cotangents[0])
        mine = dict(grads.get(id(encoder), {}))
        for name, grad in param_grads.items():
            mine[name] = mine[name] + grad if name in mine else grad
        return leaves, {**grads, id(encoder): mine}

    def zero_grads(self) -> dict:
        return {}
