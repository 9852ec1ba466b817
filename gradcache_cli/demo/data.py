"""The demo's data set: (docstring, code) pairs mined from the Python standard library at run time.

Every Python installation carries its standard library as source, so the demo has real data with no
download. Each function or method with a docstring becomes one pair, as in the CodeSearchNet code
search task: the query is the docstring's first paragraph, the document is the function's source with
the docstring removed. Sources are parsed with :mod:`ast`, never imported (importing ``antigravity``
opens a browser; importing ``this`` prints). Pairs are split into train and held-out test *by
top-level module*, so no test function shares a package with a training function, with a fixed seed.

The pairs are cached as gzipped JSON under :func:`cache_dir` (``$GRADCACHE_CACHE`` or
``~/.cache/gradcache``), keyed by the Python version, so later runs load in well under a second. This
module uses the standard library only.
"""

from __future__ import annotations

import ast
import gzip
import json
import os
import random
import re
import sys
import sysconfig
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

# Bump when the extraction rules change, so that stale caches are not reused.
FORMAT_VERSION = 1

# Folders that hold tests, installed third-party code or tools rather than library functions.
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}

_MIN_QUERY_WORDS = 3


class Pair(NamedTuple):
    """One (query, code) pair and where it came from."""

    module: str    # top-level module or package, the unit of the train/test split
    name: str      # qualified name inside its file, e.g. ``Path.read_text``
    path: str      # file, relative to the standard library folder
    line: int      # line of the ``def``
    query: str     # first paragraph of the docstring, whitespace collapsed
    code: str      # source of the function without its docstring, dedented


class Dataset(NamedTuple):
    """Train and held-out test pairs, split by module; ``source`` says where they were read from."""

    train: list[Pair]
    test: list[Pair]
    source: str


def cache_dir() -> Path:
    """The folder for cached files: ``$GRADCACHE_CACHE`` if set, else ``~/.cache/gradcache``."""
    env = os.environ.get("GRADCACHE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gradcache"


def stdlib_dir() -> Path:
    """The folder holding this interpreter's pure-Python standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def _first_paragraph(docstring: str) -> str:
    paragraph = re.split(r"\n\s*\n", docstring.strip(), maxsplit=1)[0]
    return " ".join(paragraph.split())


def _dedent(lines: list[str]) -> str:
    indents = [len(line) - len(line.lstrip()) for line in lines if line.strip()]
    cut = min(indents) if indents else 0
    return "\n".join(line[cut:].rstrip() for line in lines).strip("\n")


class _Collector(ast.NodeVisitor):
    """Walks one module's tree and yields (qualified name, node) for every function, nested too."""

    def __init__(self) -> None:
        self.stack: list[str] = []
        self.found: list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]] = []

    def _visit_scope(self, node: ast.AST, name: str) -> None:
        self.stack.append(name)
        self.generic_visit(node)
        self.stack.pop()

    def visit_ClassDef(self, node: ast.ClassDef) -> None:  # noqa: N802 - ast's naming
        self._visit_scope(node, node.name)

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:  # noqa: N802
        self.found.append((".".join([*self.stack, node.name]), node))
        self._visit_scope(node, node.name)

    visit_AsyncFunctionDef = visit_FunctionDef  # noqa: N815


def _pair_from(node: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str]) -> tuple[str, str] | None:
    """(query, code) for one function, or None when it has no usable docstring or no body."""
    docstring = ast.get_docstring(node)
    if not docstring or len(node.body) < 2:
        return None
    query = _first_paragraph(docstring)
    if len(query.split()) < _MIN_QUERY_WORDS:
        return None
    doc_node = node.body[0]
    first, last = doc_node.lineno, doc_node.end_lineno
    assert last is not None  # ast.parse gives every node its end position
    # Remove the docstring's lines only when it occupies them alone (the usual layout); a docstring
    # sharing a line with other code is rare and not worth a character-level cut.
    # ast's column offsets count UTF-8 bytes, hence the encoding.
    before = lines[first - 1].encode("utf-8")[:doc_node.col_offset]
    after = lines[last - 1].encode("utf-8")[doc_node.end_col_offset:]
    if before.strip() or after.strip():
        return None
    start = node.decorator_list[0].lineno if node.decorator_list else node.lineno
    kept = lines[start - 1:first - 1] + lines[last:node.end_lineno]
    code = _dedent(kept)
    if not code:
        return None
    return query, code


def iter_source_files(root: Path) -> Iterator[Path]:
    """Every ``.py`` file under ``root`` that is library code, in a fixed (sorted) order."""
    for dirpath, dirnames, filenames in os.walk(root):
        # Sorting in place makes os.walk's order, hence the data set, independent of the file system.
        dirnames[:] = sorted(d for d in dirnames
                             if d not in _SKIP_DIRS and not d.startswith(("config-", "lib-dynload")))
        for filename in sorted(filenames):
            if filename.endswith(".py"):
                yield Path(dirpath) / filename


def extract_pairs(root: Path | None = None) -> list[Pair]:
    """Parses every library file under ``root`` (the standard library by default) into pairs.

    Pairs are unique by query (a docstring like "Return self==value." repeated across classes would
    make retrieval ambiguous): the first in file order is kept.

    >>> pairs = extract_pairs()
    >>> len(pairs) > 3000 and all(p.query and p.code for p in pairs[:10])
    True
    """
    root = Path(root) if root is not None else stdlib_dir()
    pairs: list[Pair] = []
    seen: set[str] = set()
    for path in iter_source_files(root):
        relative = path.relative_to(root)
        module = relative.parts[0].removesuffix(".py")
        try:
            text = path.read_text(encoding="utf-8")
            tree = ast.parse(text, filename=str(path))
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue  # a few files are templates or need another Python; skipping them is harmless
        # Split on newlines only: str.splitlines also breaks at form feeds, which some stdlib files
        # contain, and would then disagree with ast's line numbers.
        lines = text.replace("\r\n", "\n").split("\n")
        collector = _Collector()
        collector.visit(tree)
        for name, node in collector.found:
            made = _pair_from(node, lines)
            if made is None:
                continue
            query, code = made
            key = query.lower()
            if key in seen:
                continue
            seen.add(key)
            pairs.append(Pair(module, name, relative.as_posix(), node.lineno, query, code))
    return pairs


def split_by_module(pairs: Sequence[Pair], *, test_fraction: float = 0.2,
                    seed: int = 0) -> tuple[list[Pair], list[Pair]]:
    """Splits pairs into (train, test) by top-level module, with a fixed seed.

    Modules are shuffled with ``random.Random(seed)`` and moved to the test side until it holds at
    least ``test_fraction`` of the pairs (modules larger than a quarter of that, or that would
    overshoot it by more than a tenth, are passed over); no module is on both sides.

    >>> a = Pair("a", "f", "a.py", 1, "q", "c")
    >>> b = Pair("b", "g", "b.py", 1, "q", "c")
    >>> train, test = split_by_module([a] * 9 + [b] * 2, test_fraction=0.2, seed=0)
    >>> {p.module for p in train}.isdisjoint({p.module for p in test})
    True
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    modules = sorted({pair.module for pair in pairs})
    random.Random(seed).shuffle(modules)
    target = test_fraction * len(pairs)
    counts: dict[str, int] = {}
    for pair in pairs:
        counts[pair.module] = counts.get(pair.module, 0) + 1
    test_modules: set[str] = set()
    taken = 0
    for module in modules:
        if taken >= target:
            break
        # A module bigger than a quarter of the target, or one that would overshoot it by more than
        # a tenth, stays in train: one big package (tkinter holds a tenth of the stdlib's pairs)
        # must not make up half the test set, and the test size should not depend on luck.
        if counts[module] > target / 4 or taken + counts[module] > 1.1 * target:
            continue
        test_modules.add(module)
        taken += counts[module]
    train = [pair for pair in pairs if pair.module not in test_modules]
    test = [pair for pair in pairs if pair.module in test_modules]
    return train, test


def cache_path(directory: Path | None = None) -> Path:
    """The cache file for this interpreter's standard library and this extraction format."""
    directory = Path(directory) if directory is not None else cache_dir()
    version = "{}{}.{}.{}".format(sys.implementation.name, *sys.version_info[:3])
    return directory / f"stdlib-pairs-v{FORMAT_VERSION}-{version}.json.gz"


def _write_atomically(path: Path, pairs: list[Pair]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # A temporary file then a rename: two demos starting at once never read a half-written cache.
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as out:
            out.write(json.dumps([list(pair) for pair in pairs]).encode("utf-8"))
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def load_pairs(directory: Path | None = None, *, rebuild: bool = False) -> tuple[list[Pair], str]:
    """All pairs, from the cache when present (else extracted and cached); also says which.

    A cache that cannot be read or written is not fatal: the pairs are then extracted in memory.
    """
    path = cache_path(directory)
    if not rebuild and path.exists():
        try:
            with gzip.open(path, "rb") as handle:
                rows = json.loads(handle.read().decode("utf-8"))
            return [Pair(*row) for row in rows], f"cache {path}"
        except (OSError, ValueError, TypeError):
            pass  # corrupt or from another layout: rebuild below
    pairs = extract_pairs()
    try:
        _write_atomically(path, pairs)
        where = f"built from {stdlib_dir()}, cached to {path}"
    except OSError as error:
        where = f"built from {stdlib_dir()} (not cached: {error.strerror or error})"
    return pairs, where


def load_dataset(directory: Path | None = None, *, test_fraction: float = 0.2, seed: int = 0,
                 rebuild: bool = False) -> Dataset:
    """The demo's train and held-out test pairs (see :func:`split_by_module`)."""
    pairs, source = load_pairs(directory, rebuild=rebuild)
    train, test = split_by_module(pairs, test_fraction=test_fraction, seed=seed)
    return Dataset(train, test, source)
