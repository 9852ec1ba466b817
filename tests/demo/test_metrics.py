"""Retrieval metrics on cases small enough to check by hand."""

from __future__ import annotations

import numpy as np
import pytest

from gradcache_cli.demo.metrics import Quality, format_bytes, ranks, retrieval_quality, table


def test_perfect_retrieval_scores_one():
    vectors = np.eye(5)
    assert retrieval_quality(vectors, vectors) == Quality(1.0, 1.0)


def test_known_ranks_give_known_mrr_and_recall():
    # Query i's right answer is code i; the scores put it at ranks 0, 1 and 2.
    scores = np.array([[9.0, 1.0, 0.0],
                       [5.0, 4.0, 0.0],
                       [7.0, 8.0, 1.0]])
    assert ranks(scores).tolist() == [0, 1, 2]
    queries = scores          # scores = queries @ codes.T with codes = identity
    quality = retrieval_quality(queries, np.eye(3))
    assert quality.mrr10 == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)
    assert quality.recall1 == pytest.approx(1 / 3)


def test_ranks_past_the_cutoff_count_zero():
    n = 12
    queries = np.zeros((n, n))
    queries[0] = np.arange(n, 0, -1)       # query 0 scores its own answer (column 0) highest
    queries[0, 0] = 0.5                   # ...now lowest: rank 11, outside the top ten
    for i in range(1, n):
        queries[i, i] = 1.0
    quality = retrieval_quality(queries, np.eye(n), k=10)
    assert quality.mrr10 == pytest.approx((n - 1) / n)
    assert quality.recall1 == pytest.approx((n - 1) / n)


def test_ties_count_against_the_model():
    constant = np.ones((4, 3))
    assert retrieval_quality(constant, constant) == Quality(mrr10=0.25, recall1=0.0)


def test_blocks_do_not_change_the_result():
    rng = np.random.default_rng(0)
    queries, codes = rng.normal(size=(50, 8)), rng.normal(size=(50, 8))
    assert retrieval_quality(queries, codes, block=7) == retrieval_quality(queries, codes)


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError):
        retrieval_quality(np.eye(3), np.eye(4))
    with pytest.raises(ValueError):
        ranks(np.ones((2, 3)))


def test_formatting_helpers():
    assert format_bytes(512) == "512 B"
    assert format_bytes(5 * 2**30) == "5.0 GiB"
    assert table([[1, "x"]], ["a", "b"]).splitlines() == ["a  b", "1  x"]
