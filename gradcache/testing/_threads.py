"""A :class:`gradcache.Collective` whose ranks are threads of one process, for tests.

It lets the core's distributed schedule -- gathering, the gradient of each rank's own rows, the
agreements that stop every rank when one fails -- be tested, and a new backend's collective be
compared, with no sockets. Rows are joined with numpy by default; give ``concat`` (``torch.cat``,
``jnp.concatenate``, ``tf.concat``) to run an adapter's step on thread ranks with its own tensors. :func:`run_ranks` starts the ranks and returns what each
returned or raised; every wait has a timeout, so a schedule that would hang fails the test instead.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from gradcache._collective import Collective


class _Board:
    """What the ranks of one run share: a slot per rank and a barrier."""

    def __init__(self, world_size: int, timeout: float):
        self.slots: list[Any] = [None] * world_size
        self.barrier = threading.Barrier(world_size, timeout=timeout)


class ThreadCollective(Collective):
    """Rank ``rank`` of ``world_size`` threads sharing one board (see :func:`run_ranks`)."""

    agrees = True

    def __init__(self, board: _Board, rank: int, *, grad_scale: float = 1.0,
                 concat: Callable[[list], Any] | None = None):
        self.board = board
        self.concat = concat or (lambda leaves: np.concatenate(leaves, axis=0))
        self.rank = rank
        self.world_size = len(board.slots)
        self.grad_scale = grad_scale
        self.calls: list[str] = []   # the collectives this rank ran, in order (tests read it)

    def _all(self, value: Any, what: str) -> list[Any]:
        self.calls.append(what)
        self.board.slots[self.rank] = value
        self.board.barrier.wait()
        values = list(self.board.slots)
        self.board.barrier.wait()   # nobody overwrites a slot before everybody has read it
        return values

    def exchange(self, payload: Any) -> list[Any]:
        return self._all(payload, "exchange")

    def all_gather_rows(self, leaf: Any, counts: Sequence[int]) -> Any:
        return self.concat(self._all(leaf, "all_gather"))

    def local_rows(self, leaf: Any, counts: Sequence[int]) -> Any:
        start = sum(counts[:self.rank])
        return leaf[start:start + counts[self.rank]]

    def reduce_scatter_rows(self, leaf: Any, counts: Sequence[int]) -> Any:
        return self.local_rows(sum(self._all(leaf, "reduce_scatter")), counts)

    def all_reduce_sum(self, value: Any) -> Any:
        return sum(self._all(value, "all_reduce"))


def run_ranks(world_size: int, fn: Callable[[int, ThreadCollective], Any], *,
              grad_scale: float = 1.0, timeout: float = 20.0,
              concat: Callable[[list], Any] | None = None) -> list[tuple[Any, BaseException | None]]:
    """Runs ``fn(rank, collective)`` on ``world_size`` threads; returns ``(result, error)`` per rank.

    ``concat`` joins the ranks' rows in ``all_gather_rows`` (default: ``numpy.concatenate``).

    >>> run_ranks(3, lambda rank, c: c.all_reduce_sum(rank + 1))
    [(6, None), (6, None), (6, None)]
    """
    board = _Board(world_size, timeout)
    outcomes: list[tuple[Any, BaseException | None]] = [(None, None)] * world_size

    def main(rank: int) -> None:
        try:
            collective = ThreadCollective(board, rank, grad_scale=grad_scale, concat=concat)
            outcomes[rank] = (fn(rank, collective), None)
        except BaseException as error:  # reported to the caller, who decides
            outcomes[rank] = (None, error)

    threads = [threading.Thread(target=main, args=(rank,), daemon=True) for rank in range(world_size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout * 4)
        if thread.is_alive():
            raise TimeoutError(f"a rank did not finish within {timeout * 4:g} s")
    return outcomes
