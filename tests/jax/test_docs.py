"""Every Python example of ``docs/jax.md`` runs as written (in JAX's default float32)."""

from __future__ import annotations

import re
from pathlib import Path

import jax
import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "jax.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_the_guide_has_examples():
    assert len(BLOCKS) >= 7


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_example_runs(index):
    code = BLOCKS[index]
    for module in ("flax", "equinox", "optax"):
        if re.search(rf"^(import|from) {module}\b", code, flags=re.M):
            pytest.importorskip(module)
    with jax.enable_x64(False):  # as a user runs it, not as the rest of this folder
        exec(compile(code, f"{DOC.name}[{index}]", "exec"), {"__name__": f"jax_md_{index}"})
