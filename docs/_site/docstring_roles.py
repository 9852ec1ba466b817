"""Griffe extension of the documentation site: docstrings written for ``help()``, shown as Markdown.

The docstrings are plain text with Sphinx roles (``:class:`Backend```) and doctest examples
(``>>>`` lines, which the test suite runs). Rendered as Markdown, a role would show as literal text
and an example's output such as ``[8, 4]`` would read as a link reference. So a role becomes the
code span of its target, and each run of example lines becomes a ``pycon`` code block.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|data|attr|exc|obj|const):`~?([^`]+)`")


def _fence_examples(text: str) -> str:
    out: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.lstrip().startswith(">>>"):
            out.append(line)
            i += 1
            continue
        indent = line[:len(line) - len(line.lstrip())]
        out.append(f"{indent}```pycon")
        while i < len(lines) and lines[i].strip():
            out.append(lines[i])
            i += 1
        out.append(f"{indent}```")
    return "\n".join(out)


class DocstringRoles(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _fence_examples(ROLE.sub(r"`\1`", obj.docstring.value))
