"""A gradient-cached contrastive LightningModule: ``training_step`` returns ``cached_loss(...)``.

    python docs/examples/lightning_train.py                                  # train 2 steps
    python docs/examples/lightning_train.py --check --accumulate 2           # compare, float32
    python docs/examples/lightning_train.py --check --precision bf16-mixed

Automatic optimization is untouched: Lightning divides the returned loss by
``accumulate_grad_batches``, calls backward on it (that backward is the second, chunked pass of
the cached loss, scaled accordingly), steps the optimizer and zeroes the gradients. Under
``validation_step`` Lightning runs without gradients, and ``cached_loss`` then just returns the
loss. With ``--check`` the same training runs without caching (SGD, whose update is proportional
to the gradient) and the script exits non-zero unless both moved every parameter alike.
"""

from __future__ import annotations

import argparse
import sys

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from gradcache_torch import cached_loss

BATCH = 8        # query-passage pairs per batch
ROWS = 32        # 2 optimizer steps of 2 accumulated batches


def make_encoder() -> torch.nn.Module:
    torch.manual_seed(0)       # the same initial weights in every run
    return torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 32))


def make_loader() -> DataLoader:
    generator = torch.Generator().manual_seed(1)
    queries = torch.randn(ROWS, 16, generator=generator)
    passages = queries + 0.3 * torch.randn(ROWS, 16, generator=generator)
    return DataLoader(TensorDataset(queries, passages), batch_size=BATCH)


def info_nce(q: torch.Tensor, p: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """In-batch negatives: query ``i``'s positive is passage ``i``."""
    q, p = F.normalize(q.float(), dim=-1), F.normalize(p.float(), dim=-1)
    return F.cross_entropy(q @ p.T / temperature, torch.arange(len(q), device=q.device))


class Contrastive(L.LightningModule):
    """``cached=False`` is the ordinary module: the whole batch's activations held at once."""

    def __init__(self, cached: bool = True, chunk_size: int = 3, lr: float = 0.5) -> None:
        super().__init__()
        self.encoder = make_encoder()
        self.cached, self.chunk_size, self.lr = cached, chunk_size, lr

    def loss(self, batch: list[torch.Tensor]) -> torch.Tensor:
        queries, passages = batch
        if self.cached:
            return cached_loss(self.encoder, (queries, passages), info_nce,
                               chunk_size=self.chunk_size)
        return info_nce(self.encoder(queries), self.encoder(passages))

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.loss(batch)

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        self.log("val_loss", self.loss(batch))    # no gradients here: just the loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def make_trainer(**kwargs: object) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, **kwargs)


def fit(cached: bool, accumulate: int = 1, precision: str = "32-true") -> Contrastive:
    """2 optimizer steps (after Lightning's sanity check of validation); returns the module."""
    module = Contrastive(cached=cached)
    make_trainer(max_steps=2, accumulate_grad_batches=accumulate,
                 precision=precision).fit(module, make_loader(), make_loader())
    return module


def largest_difference(got: Contrastive, want: Contrastive) -> float:
    """The largest difference of two runs' parameter updates, relative to the second's, tensor by
    tensor (every tensor of this model moves)."""
    start = make_encoder()
    with torch.no_grad():
        return max(float(((a - s) - (b - s)).norm() / (b - s).norm()) for a, b, s
                   in zip(got.encoder.parameters(), want.encoder.parameters(),
                          start.parameters()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with an uncached run")
    parser.add_argument("--accumulate", type=int, default=1, help="accumulate_grad_batches")
    parser.add_argument("--precision", default="32-true", help="32-true or bf16-mixed")
    args = parser.parse_args(argv)
    cached = fit(True, args.accumulate, args.precision)
    metrics = make_trainer().validate(cached, make_loader(), verbose=False)
    print(f"validation loss after 2 steps: {metrics[0]['val_loss']:.4f}")
    if not args.check:
        return 0
    worst = largest_difference(cached, fit(False, args.accumulate, args.precision))
    tolerance = 3e-2 if args.precision.startswith("bf16") else 1e-4   # see the tests
    print(f"largest relative difference of the updates from an uncached run: {worst:.2e} "
          f"(tolerance {tolerance:g})")
    return 0 if worst <= tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
