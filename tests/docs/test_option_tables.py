"""The argument tables of the backend guides list every option the adapters share.

``gradcache.StepOptions`` declares the options once; a table that misses one (``sort_by_length``
was missing from docs/torch.md's) is a guide that went stale when the option was added.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gradcache import StepOptions

DOCS = Path(__file__).resolve().parents[2] / "docs"


@pytest.mark.parametrize("page", ["torch.md", "jax.md"])
def test_the_argument_table_lists_every_shared_option(page):
    text = (DOCS / page).read_text()
    start = text.index("## Arguments")
    section = text[start:text.index("\n## ", start + 1)]
    listed = {name for cell in re.findall(r"^\| ([^|]+) \|", section, re.M)
              for name in re.findall(r"`(\w+)`", cell)}
    assert set(StepOptions.names()) <= listed, sorted(set(StepOptions.names()) - listed)
