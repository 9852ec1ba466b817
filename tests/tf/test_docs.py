"""The Python examples of ``docs/tf.md`` run as written, in order, in one namespace."""

from __future__ import annotations

import pathlib
import re

import tests.tf  # noqa: F401

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
