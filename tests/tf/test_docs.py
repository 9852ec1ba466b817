"""The Python examples of ``docs/tf.md`` run as written, in order, in one namespace; so do the
README's TensorFlow blocks (see tests/docs/blocks.py)."""

from __future__ import annotations

import pathlib
import re

import pytest

import tests.tf  # noqa: F401
from tests.docs.blocks import chain_id, chains_run_in, run_chain

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "tf.md"


def test_docs_examples_run(keras, capsys) -> None:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) >= 5
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(DOC), "exec"), namespace)  # noqa: S102 - our own documentation
    printed = capsys.readouterr().out.split()
    assert printed[:2] == ["GradCacheError", "GradCacheError"]
    assert keras.mixed_precision.global_policy().name == "float32"


@pytest.mark.parametrize("chain", chains_run_in(__file__), ids=chain_id)
def test_blocks_of_other_pages_run(chain, keras) -> None:
    """The README's TensorFlow blocks (their directives name this file)."""
    run_chain(chain)
