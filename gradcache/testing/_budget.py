"""How many examples a property test draws: the everyday budget, or many more for a deep run.

Every property test in the suite states the number of examples that makes it worth running on each
commit (a few per backend that compiles per shape, more where a step is cheap) and asks
:func:`examples` for its budget. ``make test`` runs that many, derandomised on CI, so that a landing
never hinges on luck and the suite fits its time. ``make test-deep`` sets ``GRADCACHE_DEEP`` to a
factor (10 there) and every budget is multiplied by it, with fresh random draws: the long random
exploration that looks for new counterexamples. Standard library only.
"""

from __future__ import annotations

import os

DEEP_VARIABLE = "GRADCACHE_DEEP"


def deep_factor() -> int:
    """The multiplier ``GRADCACHE_DEEP`` asks for (1 when unset, empty or not a positive integer)."""
    value = os.environ.get(DEEP_VARIABLE, "").strip()
    try:
        factor = int(value)
    except ValueError:
        return 1
    return max(factor, 1)


def examples(everyday: int) -> int:
    """The example budget of a property test whose everyday budget is ``everyday``.

    >>> examples(12) >= 12
    True
    """
    return max(1, everyday) * deep_factor()
