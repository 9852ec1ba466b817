"""Fixtures of the demo tests: the standard-library data set, built once into a temporary cache."""

from __future__ import annotations

import pytest

from gradcache_cli.demo import data


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory):
    """A cache folder holding the data set, extracted once for the whole test session."""
    folder = tmp_path_factory.mktemp("gradcache-cache")
    data.load_pairs(folder)
    return folder


@pytest.fixture(scope="session")
def all_pairs(demo_cache):
    """Every pair of the data set (from the session's cache)."""
    pairs, _ = data.load_pairs(demo_cache)
    return pairs
