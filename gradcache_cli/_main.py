"""The ``gradcache`` command line: ``gradcache demo`` and ``gradcache bench``.

The console script ``gradcache`` runs :func:`main`, as does ``python -m gradcache_cli``.
Subcommands are wired lazily: no framework is imported until a subcommand runs a backend, so ``gradcache --help`` and bad arguments cost no framework import. Every user
error -- an unknown or missing backend, a chunk larger than the batch, a non-positive size -- ends
in one line on stderr and exit status 2, never a traceback. ``demo`` runs
:mod:`gradcache_cli.demo.runner`; ``bench`` runs :mod:`gradcache_cli.bench.runner`
(``add_arguments(parser)`` and ``run(args)``), which plans and reports and imports no framework.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from gradcache import __version__
from gradcache_cli.bench import runner as bench_runner
from gradcache_cli.demo import options


class _OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (``gradcache demo: error: ...``), exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``gradcache`` and its subcommands."""
    parser = _OneLineParser(
        prog="gradcache",
        description="Gradient caching for contrastive learning: full-batch-exact gradients for "
                    "batches larger than memory.")
    parser.add_argument("--version", action="version", version=f"gradcache {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_OneLineParser)
    commands.required = True
    demo = commands.add_parser(
        "demo", help="train a code-search retriever on the standard library with a batch larger "
                     "than memory",
        description="Trains a dual encoder to find a standard-library function from its "
                    "docstring, with a contrastive batch far larger than the chunk that bounds "
                    "memory; prints retrieval quality before and after, the memory of the step, "
                    "and a small-batch run with the same epochs for comparison.")
    options.add_arguments(demo)
    bench = commands.add_parser("bench", help="memory and speed curves, cached vs full-batch step")
    bench_runner.add_arguments(bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the ``gradcache`` command line; returns the exit status (0 ok, 2 usage, 130 interrupt)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "bench":
            return int(bench_runner.run(args) or 0)
        options.finalize(args)
        from gradcache_cli.demo import runner

        runner.run(args)
        return 0
    except options.UsageError as error:
        print(f"gradcache {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gradcache {args.command}: interrupted", file=sys.stderr)
        return 130
