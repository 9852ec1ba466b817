"""Snapshots of every torch random stream a forward pass can draw from, and their exact replay.

Pass 2 must see the dropout masks of pass 1. The original GradCache replayed only the devices of the
inputs, so a model on another GPU (or a CPU-side op) drew new masks and gradients were silently
wrong. A snapshot here holds the CPU generator and *every* initialised CUDA device's generator (and
MPS's when present); it never initialises a device that is not in use.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RngState:
    """The states of the CPU, CUDA and MPS generators at one moment."""

    cpu: torch.Tensor
    cuda: tuple[torch.Tensor, ...] | None
    mps: torch.Tensor | None

    @classmethod
    def capture(cls) -> RngState:
        cuda = None
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            cuda = tuple(torch.cuda.get_rng_state_all())
        mps = None
        if hasattr(torch, "mps") and torch.backends.mps.is_available():
            mps = torch.mps.get_rng_state()
        return cls(torch.get_rng_state(), cuda, mps)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(list(self.cuda))
        elif torch.cuda.is_available() and torch.cuda.is_initialized():
            # CUDA was first used after this snapshot (e.g. a lazily moved model): its streams
            # cannot be put back to a state we never saw, so say so instead of replaying wrongly.
            raise RuntimeError("CUDA was initialised after the random state was captured; "
                               "initialise it before the step (e.g. move the model first)")
        if self.mps is not None:
            torch.mps.set_rng_state(self.mps)


@contextlib.contextmanager
def replay(state: RngState) -> Iterator[None]:
    """Runs the block under ``state``'s random streams, then puts the current streams back."""
    current = RngState.capture()
    state.restore()
    try:
        yield
    finally:
        current.restore()
