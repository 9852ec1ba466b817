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
