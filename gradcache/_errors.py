"""The one exception type of gradcache and the helpers that word its messages.

Every error the library raises for bad input is a :class:`GradCacheError` (a ``ValueError``), and its
message names the input group, the chunk and the shapes involved, so that a user can find the culprit
without a debugger. Errors raised by user code (an encoder, a loss) are never wrapped or replaced:
they propagate with their own type and get a note saying where in the step they happened.
"""

from __future__ import annotations

from typing import Any


class GradCacheError(ValueError):
    """Bad input to a cached step, or a contract the step could not keep.

    Raised before any gradient is touched when the inputs are malformed, and after the step's
    gradients were rolled back when a check fails mid-step (a non-finite loss, a recomputation that
    differs from pass 1).

    >>> from gradcache import GradCacheError
    >>> issubclass(GradCacheError, ValueError)
    True
    """


def where(group: int | None = None, chunk: Any = None, pass_: str | None = None) -> str:
    """Words a location inside a step: ``group 1, chunk 3 (pass 2)``."""
    parts = []
    if group is not None:
        parts.append(f"group {group}")
    if chunk is not None:
        parts.append(f"chunk {chunk}")
    text = ", ".join(parts)
    if pass_:
        text = f"{text} ({pass_})" if text else pass_
    return text


def add_location_note(error: BaseException, text: str) -> None:
    """Attaches ``text`` to an exception once, as a PEP 678 note.

    Python 3.11+ prints notes under the traceback. Python 3.10 has no ``add_note``: the note is
    kept in ``__notes__`` by hand there (what the ``exceptiongroup`` backport and pytest read), so
    code that inspects the error finds it on every supported Python.
    """
    notes = getattr(error, "__notes__", None)
    if isinstance(notes, list) and text in notes:
        return
    add_note = getattr(error, "add_note", None)
    if add_note is not None:
        add_note(text)
        return
    try:
        # typeshed declares __notes__ from Python 3.11 on; this is the 3.10 path
        error.__notes__ = [*(notes or []), text]  # type: ignore[attr-defined]
    except (AttributeError, TypeError):  # an exception type that refuses new attributes
        pass
