"""``docs/extending.md`` cannot go stale: it lists every method of the protocol, and its code runs.

The page is the contract a new adapter's author reads, so the test holds it against the code: every
public method of :class:`gradcache.Backend` must appear in the page's tables (and nothing that is
not a method), and every ```python block runs, in order, in one namespace (```py blocks are
illustrations that need code of the reader's own).
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import gradcache

PAGE = Path(__file__).resolve().parents[2] / "docs" / "extending.md"


def _protocol_methods() -> set[str]:
    return {name for name, value in vars(gradcache.Backend).items()
            if not name.startswith("_") and inspect.isfunction(value)}


def test_the_page_lists_every_method_of_the_protocol() -> None:
    text = PAGE.read_text()
    section = text[text.index("## The protocol"):text.index("## A worked example")]
    listed = set(re.findall(r"^\| `(\w+)\(", section, flags=re.MULTILINE))
    assert listed == _protocol_methods(), (
        f"missing from the page: {sorted(_protocol_methods() - listed)}; "
        f"not in the code: {sorted(listed - _protocol_methods())}")
    required = re.search(r"Required \((\d+)\)", section)
    assert required is not None
    unimplemented = {name for name in _protocol_methods()
                     if "raise NotImplementedError" in inspect.getsource(getattr(gradcache.Backend, name))}
    assert int(required.group(1)) == len(unimplemented)


def test_the_pages_code_runs() -> None:
    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.DOTALL)
    assert blocks
    namespace: dict = {"__name__": "extending_md"}
    for block in blocks:
        exec(compile(block, str(PAGE), "exec"), namespace)   # noqa: S102 - the docs' own code


NUMBERS = {"ten": 10, "fifteen": 15, "twenty": 20, "twenty-five": 25, "thirty": 30, "forty": 40, "fifty": 50,
           "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90, "a hundred": 100}


def test_the_sizes_the_page_quotes_are_the_code_s() -> None:
    """The page says how small a backend is; the sizes it quotes are measured, within 20%."""
    import ast

    text = " ".join(PAGE.read_text().split())
    root = PAGE.parents[1]

    def lines_of(path: str, name: str, body_only: bool = False) -> int:
        tree = ast.parse((root / path).read_text())
        (node,) = [n for n in ast.walk(tree) if getattr(n, "name", None) == name]
        body = node.body[1:] if body_only and isinstance(node.body[0], ast.Expr) else [node]
        return body[-1].end_lineno - body[0].lineno + 1

    backend = re.search(r"`gradcache/testing/_numpy_backend.py` is the complete backend: a class of "
                        r"about (\w+(?: \w+)?) lines", text)
    step = re.search(r"its `cached_step` body is (?:about )?([\w-]+) lines", text)
    assert backend and step
    for said, measured in ((backend.group(1), lines_of("gradcache/testing/_numpy_backend.py",
                                                       "NumpyBackend")),
                           (step.group(1), lines_of("gradcache_torch/_step.py", "cached_step",
                                                    body_only=True))):
        assert abs(NUMBERS[said] - measured) <= 0.2 * measured, (said, measured)
