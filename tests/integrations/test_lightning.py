"""The PyTorch Lightning recipe (docs/examples/lightning_train.py): ``training_step`` returning
``cached_loss(...)`` under automatic optimization trains as the uncached module does, with and
without ``accumulate_grad_batches``; validation takes the loss without gradients."""

from __future__ import annotations

import logging

import pytest
import torch

from tests.docs.blocks import chain_id, chains_run_in, run_chain
from tests.integrations import load_example

example = load_example("lightning_train")
logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)   # GPU/TPU availability lines
# a torch 2.13 deprecation raised inside lightning/pytorch/utilities/_pytree.py, not ours
pytestmark = pytest.mark.filterwarnings(r"ignore:.*treespec, LeafSpec.*")

# bf16-mixed autocasts the whole training_step, the loss's logits included (8 significant bits,
# steps of 2**-8 = 3.9e-3 relative, amplified by the temperature 0.1); the cached run encodes
# chunks of 3 where the uncached one encodes 8 rows. The updates differ by 1.2e-2 measured (and
# the uncached bf16 run differs from the float32 one by 2.2e-2): 3e-2 catches a wrong accumulation
# scale (50-100% off) or a pass 2 that fails under autocast, not subtle errors -- the float32
# cases do that, to 1e-4 (1-2e-6 measured).
TOLERANCE = {"32-true": 1e-4, "bf16-mixed": 3e-2}


@pytest.mark.parametrize(("accumulate", "precision"),
                         [(1, "32-true"), (2, "32-true"), (2, "bf16-mixed")])
def test_automatic_optimization_updates_equal_the_uncached_module(accumulate: int,
                                                                  precision: str) -> None:
    cached = example.fit(True, accumulate, precision)
    full = example.fit(False, accumulate, precision)
    assert cached.trainer.global_step == full.trainer.global_step == 2
    assert example.largest_difference(cached, full) <= TOLERANCE[precision]


def test_validation_takes_the_cached_loss_without_gradients() -> None:
    cached, full = example.Contrastive(cached=True), example.Contrastive(cached=False)
    got = example.make_trainer().validate(cached, example.make_loader(), verbose=False)
    want = example.make_trainer().validate(full, example.make_loader(), verbose=False)
    assert got[0]["val_loss"] == pytest.approx(want[0]["val_loss"], rel=1e-6)
    assert all(p.grad is None for p in cached.parameters())
    assert torch.is_grad_enabled()


@pytest.mark.parametrize("chain", chains_run_in(__file__), ids=chain_id)
def test_the_guide_s_module_trains_and_validates(chain) -> None:
    """docs/trainers.md's ``Contrastive`` module as written, given the example's encoder, an
    optimizer and its data: Lightning fits two steps and validates."""
    namespace = run_chain(chain, {"info_nce": example.info_nce})

    class Module(namespace["Contrastive"]):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = example.make_encoder()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    module = Module()
    before = [p.detach().clone() for p in module.parameters()]
    trainer = example.make_trainer(max_steps=2)
    trainer.fit(module, example.make_loader())
    assert trainer.global_step == 2
    assert any(not torch.equal(a, b) for a, b in zip(before, module.parameters()))
    (validated,) = trainer.validate(module, example.make_loader(), verbose=False)
    assert validated["val_loss"] > 0
