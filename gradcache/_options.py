"""The options every adapter's ``cached_step`` shares: one spelling, one default, one check.

Each adapter's public ``cached_step`` takes its framework's own arguments (``params``/``rng`` in
JAX, ``variables``/``optimizer`` in TensorFlow, ``scaler`` in torch) and hands every other keyword
to :meth:`StepOptions.from_keywords` unchanged, so that an option is declared, defaulted, validated
and documented here once, and a misspelled option is an error that names the closest valid one
(never silently ignored). Standard library only.
"""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, TypedDict

from gradcache._errors import GradCacheError

#: what each shared option means, for error messages and generated docs (one line each)
OPTION_DOCS = {
    "get_rep": "picks the representation from an encoder's output (one callable or one per group)",
    "loss_kwargs": "extra keyword arguments for the loss (labels, masks)",
    "split_fn": "split_fn(group_input, chunk_size) -> list of chunks, for inputs the core cannot "
                "slice; every row in exactly one chunk, in order",
    "pad_trim": "for mapping inputs with an attention_mask, cut each chunk to its longest row",
    "sort_by_length": "form chunks from length-sorted rows (mapping inputs with an attention_mask) "
                      "so that pad_trim removes most padding; the loss still sees the caller's order",
    "check_finite": "fail the step (nothing applied) if the loss is NaN or infinite",
    "check_determinism": "compare pass 2's representations with pass 1's; fail if they differ",
    "determinism_tolerance": "relative tolerance of check_determinism",
    "progress": "a tqdm progress bar over the chunks of both passes",
    "distributed": "False (one process), True (the framework's default group, mesh or strategy), "
                   "a gradcache.Collective, or the framework's own form (see its adapter)",
}


class StepKeywords(TypedDict, total=False):
    """The shared options as keyword arguments, for type checkers (``**options: Unpack[...]``)."""

    get_rep: Callable | Sequence | None
    loss_kwargs: Mapping | None
    split_fn: Callable | None
    pad_trim: bool
    sort_by_length: bool
    check_finite: bool
    check_determinism: bool
    determinism_tolerance: float
    progress: bool
    distributed: Any


@dataclass(frozen=True)
class StepOptions:
    """The shared options of a cached step, validated.

    >>> StepOptions(check_finite=True).check_finite
    True
    >>> StepOptions.from_keywords({"chek_finite": True})
    Traceback (most recent call last):
    ...
    gradcache._errors.GradCacheError: unknown option 'chek_finite' (did you mean 'check_finite'?); ...
    """

    get_rep: Callable | Sequence | None = None
    loss_kwargs: Mapping | None = None
    split_fn: Callable | None = None
    pad_trim: bool = False
    sort_by_length: bool = False
    check_finite: bool = False
    check_determinism: bool = False
    determinism_tolerance: float = 1e-5
    progress: bool = False
    distributed: Any = False

    def __post_init__(self) -> None:
        for name in ("pad_trim", "sort_by_length", "check_finite", "check_determinism",
                     "progress"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise GradCacheError(f"{name} must be True or False, got {value!r}")
        tolerance = self.determinism_tolerance
        if (isinstance(tolerance, bool) or not isinstance(tolerance, numbers.Real)
                or not math.isfinite(tolerance) or tolerance < 0):
            raise GradCacheError(
                f"determinism_tolerance must be a finite number >= 0, got {tolerance!r}")
        if self.loss_kwargs is not None and not isinstance(self.loss_kwargs, Mapping):
            raise GradCacheError(
                f"loss_kwargs must be a mapping of keyword arguments for the loss, got "
                f"{type(self.loss_kwargs).__name__}")
        if self.loss_kwargs is not None:
            names = [key for key in self.loss_kwargs if not isinstance(key, str)]
            if names:
                raise GradCacheError(
                    f"loss_kwargs are keyword arguments for the loss, so their keys must be "
                    f"strings; got {names[0]!r}")
        if isinstance(self.distributed, (int, float)) and not isinstance(self.distributed, bool):
            raise GradCacheError(
                f"distributed= takes False, True, a gradcache.Collective or the framework's own "
                f"group, mesh or axis name, got the number {self.distributed!r}")
        if self.split_fn is not None and not callable(self.split_fn):
            raise GradCacheError(f"split_fn must be callable, got {self.split_fn!r}")
        if self.split_fn is not None and (self.pad_trim or self.sort_by_length):
            raise GradCacheError(
                "pad_trim and sort_by_length work on the core's own chunks; with a split_fn the "
                "chunks are yours: trim or sort them in split_fn instead")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(field.name for field in fields(cls))

    @classmethod
    def from_keywords(cls, keywords: Mapping[str, Any], *, adapter: str = "",
                      own: Sequence[str] = (), entry: str = "cached_step") -> StepOptions:
        """Options from the keywords a ``cached_step`` (or ``entry``, e.g. ``cached_loss``)
        received beyond its own (``own``).

        Unknown names raise a :class:`GradCacheError` naming the closest valid option.
        """
        valid = cls.names()
        for name in keywords:
            if name not in valid:
                choices = ["chunk_size", *valid, *own]
                close = difflib.get_close_matches(name, choices, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                where = f"{adapter}.{entry}" if adapter else entry
                raise GradCacheError(
                    f"unknown option {name!r}{hint}; {where} takes {', '.join(sorted(choices))}")
        return cls(**keywords)

    def step_keywords(self) -> dict[str, Any]:
        """The keywords of :func:`gradcache.run_cached_step` these options set (all but
        ``distributed``, which an adapter resolves to a collective)."""
        return {field.name: getattr(self, field.name) for field in fields(self)
                if field.name != "distributed"}
