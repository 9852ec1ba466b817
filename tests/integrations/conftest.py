"""One intra-op thread while these tests run: the models are tiny, and on a CPU shared with the
other test worker (``make test`` runs two) two threads per op spend far more time waiting for each
other than computing (a Trainer step measured 5x slower in CPU time)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
