"""Runs a function on several local torch.distributed ranks (gloo, 127.0.0.1) and collects results.

Shared by the torch distributed tests and ``benchmarks/bench_distributed.py``, which is why it lives
here rather than under ``tests/``. Each rank's return value comes back through a file
(``torch.save``), an exception as its text; the whole run stops within ``timeout`` seconds whatever
the workers do, so a hang fails the caller instead of stalling it. Imports torch.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _main(rank: int, world: int, port: int, out_dir: str, fn: Callable, args: tuple,
          pg_timeout: float) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=timedelta(seconds=pg_timeout))
    try:
        result: Any = ("ok", fn(rank, world, *args))
    except BaseException:
        result = ("error", traceback.format_exc())
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    try:
        dist.barrier()   # nobody tears the group down while another rank still works in it
        dist.destroy_process_group()
    except Exception:
        pass


def spawn(fn: Callable, world: int, *args: Any, timeout: float = 120,
          pg_timeout: float = 60) -> list[Any]:
    """``[fn(rank, world, *args) for every rank]``, run on ``world`` processes; a rank's exception
    fails the caller with its traceback. ``fn`` must be importable (defined at module level)."""
    with tempfile.TemporaryDirectory() as out_dir:
        context = mp.spawn(_main, args=(world, free_port(), out_dir, fn, args, pg_timeout),
                           nprocs=world, join=False)
        deadline = time.monotonic() + timeout
        try:
            while not context.join(timeout=max(0.1, deadline - time.monotonic())):
                if time.monotonic() > deadline:
                    break
        except mp.ProcessExitedException:
            pass
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
        results = []
        for rank in range(world):
            path = os.path.join(out_dir, f"rank{rank}.pt")
            assert os.path.exists(path), f"rank {rank} of {world} did not finish"
            status, value = torch.load(path, weights_only=False)
            assert status == "ok", f"rank {rank} raised:\n{value}"
            results.append(value)
        return results
