"""Every Python example of ``docs/mlx.md`` runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("mlx.core")

DOC = Path(__file__).resolve().parents[2] / "docs" / "mlx.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_the_guide_has_examples():
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_example_runs(index):
    exec(compile(BLOCKS[index], f"{DOC.name}[{index}]", "exec"), {"__name__": f"mlx_md_{index}"})
