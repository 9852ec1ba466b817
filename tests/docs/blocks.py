"""The Python blocks of ``README.md`` and ``docs/*.md``, and how each is run by the test suite.

Every fenced block whose language is ``python`` or ``py`` is code a reader may copy, so every one
is executed somewhere or says why it cannot be. What a block needs is said in an HTML comment on
the line just before its fence (invisible on GitHub and on the site):

    <!-- test: setup=torch_pair; continue; then=call_train_step -->

* ``setup=a,b``: the objects the block takes as the reader's own (``encoder``, ``queries``, ...),
  made by the functions of that name in :mod:`tests.docs.setups` -- never a module, so a block
  that forgets an import fails;
* ``continue``: runs in the namespace the previous block of the page left (it builds on it);
* ``then=name``: after the block, ``setups.name(namespace)`` exercises what it defined (calls the
  train step it wrote, checks the gradients it produced);
* ``in=tests/<file>.py``: that test file runs it, where its framework or processes are set up
  already (several JAX devices, TF replicas, sentence-transformers);
* ``gpu``: needs CUDA, and is skipped (with that reason) where there is none; its test carries
  the ``cuda`` marker, which ``benchmarks/gpu_check.sh`` runs;
* ``skip=<reason>``: not run, for the reason given (several hosts, one GPU per process); the
  reason runs to the end of the comment.

Pages with a runner of their own (``PAGE_RUNNERS``) run their ``python`` blocks there; their other
blocks carry ``in=`` or ``skip=``. :func:`blocks` parses a page, :func:`chains_run_in` lists the
blocks that name a test file, :func:`run_chain` runs a block with its setups and ``continue``s.
"""

from __future__ import annotations

import contextlib
import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# pages whose ```python blocks a test of their folder runs, in its own way
PAGE_RUNNERS = {
    "extending.md": "tests/core/test_extending_doc.py",
    "jax.md": "tests/jax/test_docs.py",
    "losses.md": "tests/losses/test_docs.py",
    "tf.md": "tests/tf/test_docs.py",
}
KEYS = {"setup", "continue", "then", "in", "gpu", "skip"}

_FENCE = re.compile(
    r"^(?P<directive>[ \t]*<!-- test: (?P<text>.*?) -->\n)?"
    r"(?P<indent>[ \t]*)```(?P<lang>python|py)[ \t]*\n(?P<code>.*?)^(?P=indent)```[ \t]*$",
    re.M | re.S)


@dataclass
class Block:
    page: Path
    line: int
    lang: str
    code: str
    options: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.page.name}:{self.line}"

    def __str__(self) -> str:
        return self.name


def _options(text: str | None, where: str) -> dict[str, str]:
    options: dict[str, str] = {}
    text = text or ""
    if "skip=" in text:     # the reason is free text, to the end of the comment
        text, _, reason = text.partition("skip=")
        options["skip"] = reason.strip()
    for part in filter(None, (p.strip() for p in text.split(";"))):
        key, _, value = part.partition("=")
        key = key.strip()
        if key not in KEYS:
            raise ValueError(f"{where}: unknown test directive {key!r} (known: {sorted(KEYS)})")
        options[key] = value.strip()
    if "skip" in options and not options["skip"]:
        raise ValueError(f"{where}: skip needs a reason")
    return options


def blocks(page: Path) -> list[Block]:
    """Every ``python``/``py`` block of ``page``, with its directive's options."""
    text = page.read_text(encoding="utf-8")
    found = []
    for match in _FENCE.finditer(text):
        line = text.count("\n", 0, match.start("lang")) + 1
        code = textwrap.dedent(match.group("code"))
        found.append(Block(page, line, match.group("lang"), code,
                           _options(match.group("text"), f"{page.name}:{line}")))
    return found


def all_blocks() -> list[Block]:
    return [block for page in PAGES for block in blocks(page)]


def chains(page: Path) -> list[list[Block]]:
    """The page's blocks grouped so that each ``continue`` block follows the one it builds on
    (a chain runs where its first block says)."""
    grouped: list[list[Block]] = []
    for block in blocks(page):
        if "continue" in block.options and grouped:
            grouped[-1].append(block)
        else:
            grouped.append([block])
    return grouped


def chains_run_in(test_file: str | Path) -> list[list[Block]]:
    """The chains whose first block says ``in=`` this test file (``__file__`` of the caller)."""
    relative = Path(test_file).resolve().relative_to(ROOT).as_posix()
    return [chain for page in PAGES for chain in chains(page)
            if chain[0].options.get("in") == relative]


def chain_id(chain: list[Block]) -> str:
    return chain[0].name


def run_chain(chain: list[Block], extra: dict | None = None) -> dict:
    """Runs the blocks of ``chain`` in one namespace, each after its setups; returns the namespace."""
    from tests.docs import setups

    namespace: dict = {"__name__": "docs_block", **(extra or {})}
    for block in chain:
        setup = [name.strip() for name in block.options.get("setup", "").split(",") if name.strip()]
        with contextlib.ExitStack() as stack:
            if re.search(r"^(import|from) jax\b", block.code, re.M) or any(
                    name.startswith("jax") for name in setup):
                import jax
                stack.enter_context(jax.enable_x64(False))   # as a user runs it, setup included
            for name in setup:
                made = getattr(setups, name)()
                modules = [key for key, value in made.items() if type(value).__name__ == "module"]
                assert not modules, f"setup {name} must not provide modules ({modules}): import them"
                namespace.update(made)
            # padded so that a traceback's line numbers are the page's
            code = compile("\n" * block.line + block.code, str(block.page), "exec")
            exec(code, namespace)  # noqa: S102 - our own docs
            if block.options.get("then"):
                getattr(setups, block.options["then"])(namespace)
    return namespace
