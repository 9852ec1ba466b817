"""The examples of ``docs/losses.md`` and the ``>>>`` examples of the loss modules run as written."""

from __future__ import annotations

import doctest
import importlib
import re
from pathlib import Path

import pytest

import tests.tf  # noqa: F401  (Keras on TensorFlow, quiet start-up, before anything imports it)

DOC = Path(__file__).resolve().parents[2] / "docs" / "losses.md"
FRAMEWORK_OF_BLOCK = {"PyTorch": "torch", "JAX": "jax", "TensorFlow": "tensorflow"}


def blocks() -> list[tuple[str, str]]:
    """``(section, code)`` for every Python block of the page."""
    found, section = [], None
    for part in re.split(r"(^## .*$)", DOC.read_text(), flags=re.M):
        if part.startswith("## "):
            section = part[3:].strip()
            continue
        found += [(section, code) for code in re.findall(r"```python\n(.*?)```", part, re.S)]
    return found


@pytest.mark.parametrize("section, code", blocks(), ids=[s for s, _ in blocks()])
def test_doc_example_runs(section, code):
    pytest.importorskip(FRAMEWORK_OF_BLOCK[section])
    exec(compile(code, f"{DOC.name}:{section}", "exec"), {})


@pytest.mark.parametrize("module, needs", [
    ("gradcache._tiled", None),
    ("gradcache._loss_forms", None),
    ("gradcache_torch.losses", "torch"),
    ("gradcache_jax.losses", "jax"),
    ("gradcache_tf.losses", "tensorflow"),
    ("gradcache_mlx.losses", "mlx"),
])
def test_module_examples(module, needs):
    if needs:
        pytest.importorskip(needs)
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0, result
