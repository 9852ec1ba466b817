"""Torch-specific promises: mixed precision, accumulation, checkpointing, padding, the migration API."""

from __future__ import annotations

import random
from collections import UserDict
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import gradcache
from gradcache import GradCacheError
from gradcache.testing.contract import relative_error
from gradcache_torch import (
    GradCache,
    TorchBackend,
    cached,
    cached_step,
    cat_input_tensor,
    trim_padding,
)


def info_nce(q: torch.Tensor, p: torch.Tensor, temperature: torch.Tensor | float = 0.1) -> torch.Tensor:
    scores = q @ p.T / temperature
    return F.cross_entropy(scores, torch.arange(len(q)) * (len(p) // len(q)))


class Tower(torch.nn.Module):
    def __init__(self, dim_in: int = 6, dim_out: int = 4, dropout: float = 0.0, ckpt: str = ""):
        super().__init__()
        self.a = torch.nn.Linear(dim_in, 16)
        self.b = torch.nn.Linear(16, dim_out)
        self.dropout = dropout
        self.ckpt = ckpt

    def block(self, h: torch.Tensor) -> torch.Tensor:
        return self.b(F.dropout(torch.tanh(h), self.dropout, self.training))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)  # the checkpointed block's input requires grad, as reentrant mode needs
        if self.ckpt:
            return checkpoint(self.block, h, use_reentrant=self.ckpt == "reentrant")
        return self.block(h)


def grads_of(*modules: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for m in modules for p in m.parameters()]


def assert_all_close(actual, expected, rtol=1e-10) -> None:
    """All gradients within ``rtol`` of the reference, relative to the reference's largest entry
    (some entries are exactly zero in theory, e.g. a passage tower's last bias under InfoNCE)."""
    assert [a.shape for a in actual] == [e.shape for e in expected]
    flat = lambda ts: torch.cat([t.double().flatten() for t in ts]).numpy()  # noqa: E731
    assert relative_error(flat(actual), flat(expected)) <= rtol


@pytest.fixture(autouse=True)
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def pair(rows: int = 10, dim: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, dim, generator=generator), torch.randn(rows, dim, generator=generator)


def test_grad_scaler_scales_exactly_like_backward() -> None:
    torch.manual_seed(0)
    model, q_p = Tower(), pair()
    reference = Tower()
    reference.load_state_dict(model.state_dict())
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    cached_step(model, q_p, info_nce, chunk_size=3, scaler=scaler)
    reference_scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    reference_scaler.scale(info_nce(reference(q_p[0]), reference(q_p[1]))).backward()
    assert_all_close(grads_of(model), grads_of(reference))
    assert float(model.b.bias.grad.abs().max()) > 1.0  # scaled, not raw


def test_bf16_autocast_matches_full_batch_autocast() -> None:
    torch.manual_seed(0)
    model, (q, p) = Tower().float(), (t.float() for t in pair())
    q, p = list((q, p))
    reference = Tower().float()
    reference.load_state_dict(model.state_dict())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cached_step(model, (q, p), info_nce, chunk_size=4)
        loss = info_nce(reference(q), reference(p))
    loss.backward()
    assert_all_close(grads_of(model), grads_of(reference), rtol=2e-2)


def test_calls_accumulate_like_backward() -> None:
    torch.manual_seed(0)
    model, reference = Tower(), Tower()
    reference.load_state_dict(model.state_dict())
    for seed in (1, 2):
        q, p = pair(seed=seed)
        cached_step(model, (q, p), info_nce, chunk_size=4)
        info_nce(reference(q), reference(p)).backward()
    assert_all_close(grads_of(model), grads_of(reference))


@pytest.mark.parametrize("mode", ["reentrant", "non-reentrant"])
def test_checkpointed_encoder_with_dropout(mode: str) -> None:
    torch.manual_seed(0)
    model = Tower(dropout=0.5, ckpt=mode)
    reference = Tower(dropout=0.5)
    reference.load_state_dict(model.state_dict())
    q, p = pair()
    torch.manual_seed(7)
    cached_step(model, (q, p), info_nce, chunk_size=3)
    torch.manual_seed(7)  # chunk-by-chunk reference: same chunks, same order, same masks
    reps = [torch.cat([reference(x[i:i + 3]) for i in range(0, len(x), 3)]) for x in (q, p)]
    info_nce(*reps).backward()
    assert_all_close(grads_of(model), grads_of(reference))


def test_eval_mode_encoder_matches_full_batch() -> None:
    torch.manual_seed(0)
    model = Tower(dropout=0.5).eval()
    reference = Tower(dropout=0.5).eval()
    reference.load_state_dict(model.state_dict())
    q, p = pair()
    cached_step(model, (q, p), info_nce, chunk_size=3)
    info_nce(reference(q), reference(p)).backward()
    assert_all_close(grads_of(model), grads_of(reference))


def test_learnable_temperature_gets_its_gradient_once() -> None:
    torch.manual_seed(0)
    model, reference = Tower(), Tower()
    reference.load_state_dict(model.state_dict())
    temperature = torch.nn.Parameter(torch.tensor(0.2))
    reference_temperature = torch.nn.Parameter(torch.tensor(0.2))
    q, p = pair(rows=12)
    cached_step(model, (q, p), info_nce, chunk_size=2, loss_kwargs={"temperature": temperature})
    info_nce(reference(q), reference(p), reference_temperature).backward()
    torch.testing.assert_close(temperature.grad, reference_temperature.grad, rtol=1e-10, atol=0)


def test_hard_negatives_and_separate_towers() -> None:
    torch.manual_seed(0)
    query_tower, passage_tower = Tower(), Tower()
    ref_q, ref_p = Tower(), Tower()
    ref_q.load_state_dict(query_tower.state_dict())
    ref_p.load_state_dict(passage_tower.state_dict())
    q = torch.randn(5, 6)
    p = torch.randn(15, 6)  # 3 passages per query: the positive first
    cached_step([query_tower, passage_tower], (q, p), info_nce, chunk_size=[2, 4])
    info_nce(ref_q(q), ref_p(p)).backward()
    assert_all_close(grads_of(query_tower, passage_tower), grads_of(ref_q, ref_p))


def test_non_finite_loss_rolls_back_the_loss_parameters() -> None:
    model = Tower()
    temperature = torch.nn.Parameter(torch.tensor(0.0))  # division by zero: inf/nan loss
    with pytest.raises(GradCacheError, match="not finite"):
        cached_step(model, pair(), info_nce, chunk_size=3, loss_kwargs={"temperature": temperature},
                    check_finite=True)
    assert temperature.grad is None
    assert all(p.grad is None for p in model.parameters())


def test_check_determinism_catches_python_random() -> None:
    class Noisy(Tower):
        def forward(self, x):
            return super().forward(x) * random.random()

    with pytest.raises(GradCacheError, match="differs from pass 1"):
        cached_step(Noisy(), pair(), info_nce, chunk_size=3, check_determinism=True)


def test_an_encoder_that_detaches_is_an_error() -> None:
    # a module with no trainable parameter is a frozen tower (test_cached_loss); a callable whose
    # output does not depend on anything trainable is a mistake worth naming
    model = Tower()
    with pytest.raises(GradCacheError, match=r"group 0, chunk 0 \(pass 2\).*does not depend"):
        cached_step(lambda x: model(x).detach(), pair(), info_nce, chunk_size=3)


class BatchEncoding(UserDict):
    """Stands in for Hugging Face's BatchEncoding: a Mapping, not a dict."""


@dataclass
class Output:
    last_hidden_state: torch.Tensor


class MaskedMeanEncoder(torch.nn.Module):
    """Embeds tokens and mean-pools over the attention mask, like a sentence encoder."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(50, 8)
        self.mix = torch.nn.Linear(8, 8)
        self.lengths_seen: list[int] = []

    def forward(self, input_ids, attention_mask):
        self.lengths_seen.append(input_ids.shape[1])
        hidden = torch.tanh(self.mix(self.embed(input_ids)))
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return Output((hidden * mask).sum(1) / mask.sum(1))


def token_batch(rows: int, length: int, seed: int) -> BatchEncoding:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, length + 1, (rows,), generator=generator)
    lengths[0] = 2  # the first chunk is short
    ids = torch.randint(1, 50, (rows, length), generator=generator)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    return BatchEncoding(input_ids=ids * mask, attention_mask=mask)


def test_mapping_inputs_get_rep_and_padding_trim() -> None:
    torch.manual_seed(0)
    model = MaskedMeanEncoder()
    reference = MaskedMeanEncoder()
    reference.load_state_dict(model.state_dict())
    q, p = token_batch(9, 12, 1), token_batch(9, 12, 2)
    q["attention_mask"][:3, 3:] = 0  # rows 0-2 use only 3 columns
    pool = lambda out: out.last_hidden_state  # noqa: E731
    cached_step(model, (q, p), info_nce, chunk_size=3, get_rep=pool, pad_trim=True)
    info_nce(pool(reference(**q)), pool(reference(**p))).backward()
    assert_all_close(grads_of(model), grads_of(reference), rtol=1e-12)
    assert min(model.lengths_seen) <= 3 < 12


def test_trim_padding_leaves_unpadded_chunks_alone() -> None:
    chunk = {"input_ids": torch.ones(2, 4), "attention_mask": torch.ones(2, 4)}
    assert trim_padding(chunk) is chunk


def test_dispatcher_routes_torch_tensors() -> None:
    model = Tower()
    loss = gradcache.cached_step(model, pair(), info_nce, chunk_size=4)
    assert loss.shape == () and not loss.requires_grad
    assert model.a.weight.grad is not None


def test_gradcache_class_matches_cached_step() -> None:
    torch.manual_seed(0)
    model, reference = Tower(), Tower()
    reference.load_state_dict(model.state_dict())
    q, p = pair()
    temperature = torch.tensor(0.3)
    GradCache([model, model], chunk_sizes=3, loss_fn=info_nce)(q, p, temperature=temperature)
    cached_step(reference, (q, p), info_nce, chunk_size=3, loss_kwargs={"temperature": temperature})
    assert_all_close(grads_of(model), grads_of(reference), rtol=0)


def test_gradcache_class_bf16_and_argument_checks() -> None:
    model = Tower().float()
    gc = GradCache([model, model], chunk_sizes=4, loss_fn=info_nce, bf16=True)
    q, p = (t.float() for t in pair())
    assert torch.isfinite(gc(q, p))
    with pytest.raises(GradCacheError, match="GradScaler"):
        GradCache([model], 2, info_nce, fp16=True)
    with pytest.raises(GradCacheError, match="2 models"):
        GradCache([model, model], 2, info_nce)(q)


def test_functional_decorators_match_cached_step() -> None:
    torch.manual_seed(0)
    model = Tower(dropout=0.5)
    reference = Tower(dropout=0.5)
    reference.load_state_dict(model.state_dict())
    q, p = pair(rows=8)

    @cached
    def encode(module, x):
        return module(x)

    @cat_input_tensor
    def loss_fn(queries, passages):
        return info_nce(queries, passages)

    torch.manual_seed(3)
    cache_q, cache_p, closures = [], [], []
    for i in range(0, 8, 4):  # the original package's loop: queries and passages interleaved
        rq, cq = encode(model, q[i:i + 4])
        rp, cp = encode(model, p[i:i + 4])
        cache_q.append(rq)
        cache_p.append(rp)
        closures += [(cq, rq), (cp, rp)]
    loss_fn(cache_q, passages=cache_p).backward()  # keyword lists are concatenated too
    for closure, rep in closures:
        closure(rep)

    torch.manual_seed(3)
    reps_q, reps_p = [], []
    for i in range(0, 8, 4):
        reps_q.append(reference(q[i:i + 4]))
        reps_p.append(reference(p[i:i + 4]))
    info_nce(torch.cat(reps_q), torch.cat(reps_p)).backward()
    assert_all_close(grads_of(model), grads_of(reference))


def test_length_sorted_chunks_give_the_same_gradients_in_the_callers_order() -> None:
    torch.manual_seed(0)
    model = MaskedMeanEncoder()
    reference = MaskedMeanEncoder()
    reference.load_state_dict(model.state_dict())
    q, p = token_batch(10, 12, 3), token_batch(10, 12, 4)
    pool = lambda out: out.last_hidden_state  # noqa: E731
    cached_step(model, (q, p), info_nce, chunk_size=3, get_rep=pool, pad_trim=True,
                sort_by_length=True)
    info_nce(pool(reference(**q)), pool(reference(**p))).backward()  # positives on the diagonal
    assert_all_close(grads_of(model), grads_of(reference), rtol=1e-12)
    lengths = sorted(q["attention_mask"].sum(1).tolist(), reverse=True)
    assert model.lengths_seen[0] == lengths[0] and model.lengths_seen[3] == lengths[9]


def test_pad_trim_with_per_token_representations_says_why_they_cannot_be_joined() -> None:
    # the chunks are cut to different lengths: a per-token output cannot be concatenated
    model = MaskedMeanEncoder()
    q, p = token_batch(6, 8, 1), token_batch(6, 8, 2)
    per_token = lambda out: out.hidden   # noqa: E731

    class Tokens(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, input_ids, attention_mask):
            @dataclass
            class Out:
                hidden: torch.Tensor
            return Out(torch.tanh(self.inner.mix(self.inner.embed(input_ids))))

    def token_loss(q, p):
        return (q.mean(1) @ p.mean(1).T).sum()

    with pytest.raises(RuntimeError) as info:
        cached_step(Tokens(), (q, p), token_loss, chunk_size=3, get_rep=per_token, pad_trim=True)
    assert any("pad_trim cut the chunks" in note for note in info.value.__notes__)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("distributed", ["yes", [1]])
def test_distributed_refuses_what_is_not_a_group_or_collective(distributed) -> None:
    with pytest.raises(GradCacheError, match="distributed= takes"):
        cached_step(torch.nn.Linear(3, 2), (torch.randn(4, 3),) * 2, info_nce, chunk_size=2,
                    distributed=distributed)


def test_scaler_must_be_a_grad_scaler() -> None:
    with pytest.raises(GradCacheError, match="scaler must be"):
        cached_step(torch.nn.Linear(3, 2), (torch.randn(4, 3),) * 2, info_nce, chunk_size=2,
                    scaler=3)


def test_the_backend_defaults_read_torch_tensors() -> None:
    """``shape``, ``differentiable`` and ``take_rows`` are the core's defaults on torch: they must
    agree with torch's own notions, for every dtype torch has."""
    backend = TorchBackend()
    dtypes = {value for value in vars(torch).values() if isinstance(value, torch.dtype)}
    assert len(dtypes) > 15
    for dtype in dtypes:
        assert backend.differentiable(SimpleNamespace(dtype=dtype)) == (
            dtype.is_floating_point or dtype.is_complex), dtype
    leaf = torch.arange(12.0, dtype=torch.float64).reshape(4, 3).requires_grad_()
    assert backend.shape(leaf) == (4, 3) and backend.shape(torch.tensor(1.0)) == ()
    taken = backend.take_rows(leaf, np.array([2, 0, 3, 1]))
    assert torch.equal(taken, leaf.detach()[[2, 0, 3, 1]])
    taken.sum().backward()
    assert torch.equal(leaf.grad, torch.ones(4, 3, dtype=torch.float64))
