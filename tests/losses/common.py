"""What the loss tests of every backend share: drawn cases, their data, and the comparison rule.

A case is one loss with its shapes, tile size, similarity and parameter values. Every backend module
turns a case into its own tensors, evaluates the tiled and the dense form with its own autodiff, and
hands both results (dicts of numpy arrays) to :func:`assert_same`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from hypothesis import assume
from hypothesis import strategies as st

LOSSES = ("info_nce", "clip_loss", "siglip_loss")

#: Relative error allowed between tiled and dense in float64 (the issue's bound).
TOLERANCE = 1e-12

#: Below this loss every pair is separated by a wide margin: the loss, and the gradients, are then
#: differences of nearly equal terms (``logsumexp_i - z_ii``, ``softmax_ii - 1``) in *any* evaluation
#: order, and two correct implementations differ by the rounding of those terms, far above 1e-12 of
#: the tiny difference. Such draws measure rounding, not tiling, and are skipped.
WELL_CONDITIONED_LOSS = 1e-2


@dataclass(frozen=True)
class Case:
    """One loss evaluation: ``x`` has ``rows`` rows, ``y`` has ``rows * (1 + negatives)``."""

    loss: str
    rows: int
    negatives: int
    dim: int
    tile: int
    similarity: str
    params: dict = field(default_factory=dict)
    seed: int = 0

    def data(self) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(self.seed)
        x = rng.normal(size=(self.rows, self.dim))
        y = rng.normal(size=(self.rows * (1 + self.negatives), self.dim))
        return x, y


def default_params(loss: str) -> dict:
    return {"info_nce": {"temperature": 0.3},
            "clip_loss": {"logit_scale": 2.5},
            "siglip_loss": {"logit_scale": 1.5, "logit_bias": -2.0}}[loss]


@st.composite
def cases(draw: st.DrawFn, losses: tuple = LOSSES, max_rows: int = 12) -> Case:
    """Shapes small enough to run dense, tiles from 1 row to more than the batch (most of them
    not dividing it), up to 3 hard negatives, both similarities, parameters over a wide range."""
    loss = draw(st.sampled_from(losses))
    rows = draw(st.integers(1, max_rows))
    negatives = draw(st.integers(0, 3)) if loss == "info_nce" else 0
    columns = rows * (1 + negatives)
    tile = draw(st.integers(1, columns + 2))
    similarity = draw(st.sampled_from(("dot", "cosine")))
    if loss == "info_nce":
        params = {"temperature": draw(st.floats(0.05, 2.0))}
    elif loss == "clip_loss":
        params = {"logit_scale": draw(st.floats(0.5, 30.0))}
    else:
        params = {"logit_scale": draw(st.floats(0.5, 30.0)),
                  "logit_bias": draw(st.floats(-10.0, 10.0))}
    # In one dimension cosine similarities are +-1 whatever the inputs: gradients are zero up to
    # rounding, which no relative comparison can judge.
    dim = draw(st.integers(2 if similarity == "cosine" else 1, 6))
    return Case(loss, rows, negatives, dim, tile, similarity, params, draw(st.integers(0, 2**16)))


def relative_error(actual: np.ndarray, expected: np.ndarray, floor: float = 0.0) -> float:
    """``max|actual - expected| / max(max|expected|, floor)`` (absolute when both are zero)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    scale = max(float(np.max(np.abs(expected), initial=0.0)), floor)
    diff = float(np.max(np.abs(actual - expected), initial=0.0))
    return diff / scale if scale > 0 else diff


def check_drawn(tiled: dict, dense: dict) -> None:
    """:func:`assert_same` for a drawn case, unless the draw is ill-conditioned (see above)."""
    assume(abs(float(np.asarray(dense["loss"]))) >= WELL_CONDITIONED_LOSS)
    assert_same(tiled, dense)


def assert_same(tiled: dict, dense: dict, tolerance: float = TOLERANCE) -> None:
    """Every entry of ``tiled`` within ``tolerance`` of ``dense``, relatively.

    A scalar parameter's gradient is a sum of terms of both signs that may nearly cancel; it is
    compared at the scale of the loss when it is smaller than the loss (the rounding of its terms
    is of that order), everything else at its own scale.
    """
    assert set(tiled) == set(dense), (sorted(tiled), sorted(dense))
    loss = abs(float(np.asarray(dense["loss"])))
    errors = {}
    for name, expected in dense.items():
        floor = loss if np.ndim(expected) == 0 and name != "loss" else 0.0
        errors[name] = relative_error(tiled[name], expected, floor)
    assert max(errors.values()) <= tolerance, errors
