"""Retrieval metrics and the demo's printed report, in numpy only, shared by every backend.

Every test query is scored against the *whole* held-out pool of code snippets, its own snippet being
the one relevant answer, so the numbers read like CodeSearchNet's: MRR@10 (the reciprocal rank of the
right snippet, 0 when it is not in the top ten) and recall@1 (how often it is ranked first). Ties are
counted against the model (a snippet tied with the right one ranks ahead of it), so a constant
encoder scores zero rather than looking lucky.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np


class Quality(NamedTuple):
    """Retrieval quality over one pool of pairs."""

    mrr10: float
    recall1: float

    def __str__(self) -> str:
        return f"MRR@10 {self.mrr10:.3f}  recall@1 {self.recall1:.3f}"


def ranks(scores: np.ndarray) -> np.ndarray:
    """0-based rank of the right answer of each row of a square score matrix (answer = diagonal).

    The rank counts the other candidates that score at least as high (ties count against).

    >>> ranks(np.array([[3.0, 1.0], [2.0, 2.0]])).tolist()
    [0, 1]
    """
    scores = np.asarray(scores)
    if scores.ndim != 2 or scores.shape[0] != scores.shape[1]:
        raise ValueError(f"scores must be a square matrix, got shape {scores.shape}")
    right = np.diagonal(scores)[:, None]
    at_least = (scores >= right).sum(axis=1)
    return at_least - 1  # the right answer itself is always counted once


def retrieval_quality(query_vecs: np.ndarray, code_vecs: np.ndarray, *, k: int = 10,
                      block: int = 1024) -> Quality:
    """MRR@k and recall@1 of matching row ``i`` of ``query_vecs`` to row ``i`` of ``code_vecs``.

    Scores are dot products (use normalised vectors for cosine similarity); queries are scored in
    blocks so the score matrix never needs ``n x n`` memory at once.

    >>> eye = np.eye(3)
    >>> retrieval_quality(eye, eye)
    Quality(mrr10=1.0, recall1=1.0)
    >>> retrieval_quality(eye, eye[[1, 0, 2]]).recall1  # the first two swapped
    0.3333333333333333
    """
    query_vecs = np.asarray(query_vecs, dtype=np.float64)
    code_vecs = np.asarray(code_vecs, dtype=np.float64)
    if query_vecs.shape != code_vecs.shape or query_vecs.ndim != 2:
        raise ValueError(f"query and code vectors must have the same 2-d shape, "
                         f"got {query_vecs.shape} and {code_vecs.shape}")
    n = len(query_vecs)
    all_ranks = np.empty(n, dtype=np.int64)
    for start in range(0, n, block):
        stop = min(start + block, n)
        scores = query_vecs[start:stop] @ code_vecs.T
        # The right answer's score is read from the same product, not recomputed: another
        # summation order could round it differently and rank it against itself.
        right = scores[np.arange(stop - start), np.arange(start, stop)][:, None]
        all_ranks[start:stop] = (scores >= right).sum(axis=1) - 1
    reciprocal = np.where(all_ranks < k, 1.0 / (all_ranks + 1), 0.0)
    return Quality(float(reciprocal.mean()), float((all_ranks == 0).mean()))


def format_bytes(count: float) -> str:
    """A byte count for people: ``1.5 GiB``, ``12.0 MiB``.

    >>> format_bytes(3 * 2**20), format_bytes(1536 * 2**20)
    ('3.0 MiB', '1.5 GiB')
    """
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(count) >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count:.0f} B"


def table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    """A plain-text table with left-aligned first column and right-aligned others.

    >>> print(table([["a", 1], ["bb", 22]], ["name", "n"]))
    name   n
    a      1
    bb    22
    """
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = []
    for row in cells:
        parts = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)
