"""Settings for the trainer integration tests: offline, quiet, one intra-op thread.

The offline variables are read when transformers, huggingface_hub and datasets are first imported,
so they are set here at module level (the models come from a pinned local copy; nothing is ever
fetched). One intra-op thread: the models are tiny, and on a CPU shared with the other test worker
(``make test`` runs two) two threads per op spend far more time waiting for each other than
computing (a Trainer step measured 5x slower in CPU time).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

for name, value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                    "HF_HUB_DISABLE_TELEMETRY": "1", "WANDB_DISABLED": "true",
                    "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(name, value)


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
