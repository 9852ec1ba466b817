"""A check that fails inside a compiled program, given back as the ``GradCacheError`` it raised.

Under ``jit`` the values a check reads exist only when the program runs, so the check runs on the
host as a callback; raising there aborts the program, and jaxlib reports it as a
``jax.errors.JaxRuntimeError`` whose text starts with ``INTERNAL: CpuCallback error`` and a
traceback, the check's message on its last line. That wording is jaxlib's (C++), and a library
called inside the caller's ``jit`` is not on the stack when the error surfaces, so nothing can
change it there. This module keeps the failures the callbacks raised, so that where the runtime
error passes through gradcache's own code (an eager step on a mesh) or through
:func:`unwrap_check_errors` (around the caller's jitted step), the caller gets the check's own
``GradCacheError``, message first, the runtime error as its cause. It also keeps JAX from logging
each such failure a second time: the message reaches the caller with the error.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import jax

from gradcache import GradCacheError

_LOCK = threading.Lock()
#: failures raised by check callbacks, newest last (bounded: a caller who never unwraps them)
_FAILURES: collections.deque[GradCacheError] = collections.deque(maxlen=32)


class _QuietRecordedFailures(logging.Filter):
    """Drops JAX's "jax.debug.callback failed" log record for a failure recorded here."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not getattr(error, "gradcache_check_failure", False)


_FILTER = _QuietRecordedFailures()


def _quiet_jax_log() -> None:
    logger = logging.getLogger("jax._src.debugging")
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)


def on_host(check: Callable[..., None]) -> Callable[..., None]:
    """``check`` as a host callback: a failure is recorded before it aborts the program."""
    _quiet_jax_log()

    def checked(*values: Any) -> None:
        try:
            check(*values)
        except GradCacheError as error:
            error.gradcache_check_failure = True  # type: ignore[attr-defined]
            with _LOCK:
                _FAILURES.append(error)
            raise

    return checked


def recorded_failure(error: BaseException) -> GradCacheError | None:
    """The recorded check failure that ``error`` (a ``JaxRuntimeError``) reports, taken out of
    the record; ``None`` when it reports none."""
    if not isinstance(error, jax.errors.JaxRuntimeError):
        return None
    text = str(error)
    with _LOCK:
        for failure in reversed(_FAILURES):
            if str(failure) in text:
                _FAILURES.remove(failure)
                return failure
    return None


@contextlib.contextmanager
def unwrap_check_errors() -> Iterator[None]:
    """Re-raises a check that failed inside a compiled program as its own ``GradCacheError``.

    ``check_finite`` and ``check_determinism`` under ``jit`` fail the compiled call with a
    ``jax.errors.JaxRuntimeError`` (jaxlib's wording: ``INTERNAL: CpuCallback error`` and a
    traceback, the message last). Inside this block such an error becomes the ``GradCacheError``
    the check raised, its message first, the runtime error as its ``__cause__``; any other
    exception passes unchanged. It works as a decorator too. With JAX's asynchronous dispatch a
    failure may surface only when a result is used: keep that use (``jax.block_until_ready``)
    inside the block.

    >>> import jax, jax.numpy as jnp
    >>> from gradcache import GradCacheError
    >>> from gradcache_jax import cached_step, unwrap_check_errors
    >>> step = jax.jit(lambda p, q, d: cached_step(lambda p, x: x @ p, (q, d),
    ...                                            lambda q, d: jnp.sum(q * d) / 0.0,
    ...                                            chunk_size=2, params=p, check_finite=True))
    >>> try:
    ...     with unwrap_check_errors():
    ...         jax.block_until_ready(step(jnp.ones((3, 2)), jnp.ones((4, 3)), jnp.ones((4, 3))))
    ... except GradCacheError as error:
    ...     print(error)
    the loss is not finite (inf); no gradient was applied
    """
    try:
        yield
    except jax.errors.JaxRuntimeError as error:
        failure = recorded_failure(error)
        if failure is None:
            raise
        raise failure.with_traceback(None) from error


def run_unwrapped(call: Callable[[], Any], *, wait: bool) -> Any:
    """``call()``, a compiled program run by gradcache itself (eagerly, on a mesh), a failed
    check coming out as its ``GradCacheError``; ``wait``: block until the results exist, so that
    such a failure surfaces here rather than where the caller first uses them."""
    with unwrap_check_errors():
        result = call()
        return jax.block_until_ready(result) if wait else result
