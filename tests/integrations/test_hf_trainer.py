"""The Hugging Face Trainer recipe (docs/examples/hf_trainer.py): a ``compute_loss`` returning
``cached_loss(...)`` trains exactly like the uncached ``compute_loss`` it replaces."""

from __future__ import annotations

import pytest

from tests.docs.blocks import chain_id, chains_run_in, run_chain
from tests.integrations import load_example

example = load_example("hf_trainer")

# bf16 keeps 8 significant bits (a rounding step of 2**-8 = 3.9e-3 relative). Both runs use the
# same autocast, but the uncached run multiplies whole batches of 4 where the cached one multiplies
# chunks of 3 and 1, and sums per-chunk weight gradients that were each rounded to bf16: the
# updates differ by a few bf16 steps (6.5e-3 measured). 2e-2 is five steps; a wrong gradient scale
# (accumulation not divided, or divided twice) is off by 50-100%.
BF16_TOLERANCE = 2e-2


def test_bf16_accumulated_updates_equal_the_uncached_trainer(tmp_path) -> None:
    start = {name: p.detach().clone()
             for name, p in example.tokenizer_and_model(True)[1].named_parameters()}
    cached = example.make_trainer(example.GradCacheTrainer, str(tmp_path / "cached"),
                                  optim="sgd", chunk_size=3)
    full = example.make_trainer(example.FullBatchTrainer, str(tmp_path / "full"), optim="sgd")
    assert cached.args.gradient_accumulation_steps == 2
    assert cached.accelerator.mixed_precision == "bf16"
    cached.train()
    full.train()
    assert cached.state.global_step == full.state.global_step == 2
    worst = example.largest_difference(cached.model, full.model, start)
    assert worst <= BF16_TOLERANCE
    moved = max(float((p.detach() - start[n]).abs().max()) for n, p in full.model.named_parameters())
    assert moved > 1e-3     # the comparison compares updates, not two untouched models


def test_evaluate_takes_the_cached_loss_without_gradients(tmp_path) -> None:
    cached = example.make_trainer(example.GradCacheTrainer, str(tmp_path / "cached"), bf16=False,
                                  chunk_size=3)
    full = example.make_trainer(example.FullBatchTrainer, str(tmp_path / "full"), bf16=False)
    got, want = cached.evaluate()["eval_loss"], full.evaluate()["eval_loss"]
    assert got == pytest.approx(want, rel=1e-5)
    assert all(p.grad is None for p in cached.model.parameters())


def test_the_example_script_checks_itself_in_float32() -> None:
    """Full float32: the accumulated updates agree to round-off, not merely to bf16's precision."""
    assert example.main(["--tiny", "--check", "--fp32"]) == 0


@pytest.mark.parametrize("chain", chains_run_in(__file__), ids=chain_id)
def test_the_guide_s_trainer_trains_and_evaluates(chain, tmp_path) -> None:
    """docs/trainers.md's ``ContrastiveTrainer`` (and its ``prediction_step``) as written, on the
    example's tiny model and data: one optimizer step, then an evaluation that takes the loss."""
    namespace = run_chain(chain, {"info_nce": example.info_nce, "mean_pool": example.mean_pool})
    trainer_class = namespace["ContrastiveTrainer"]
    trainer_class.prediction_step = namespace["prediction_step"]
    trainer = example.make_trainer(trainer_class, str(tmp_path), bf16=False, steps=1)
    trainer.train()
    assert trainer.state.global_step == 1
    assert trainer.evaluate()["eval_loss"] > 0
