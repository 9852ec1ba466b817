"""Bad input that only some entry points or one framework can receive, refused with its cause named.

The cases every backend shares are in the contract suite (``gradcache.testing.contract``, its
bad-input block) and in ``tests/options/test_every_backend.py``; these are the rest: how a
``split_fn``'s rows are counted when the group holds raw texts or objects the core cannot count,
torch's ``scaler`` and the migration class ``GradCache``, and JAX's ``loss_takes_params``.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from gradcache import GradCacheError

needs_torch = pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="needs torch")


class Texts:
    """A batch object the core cannot count rows of (what a custom collator might return)."""

    def __init__(self, rows: list[str]):
        self.rows = rows


def _torch_text_encoder():
    import torch

    class Encoder(torch.nn.Module):
        """Hashes each text to a row of a table: a stand-in for a tokenizer and a model."""

        def __init__(self):
            super().__init__()
            self.table = torch.nn.Parameter(torch.randn(16, 3, dtype=torch.float64))
            self.calls = 0

        def forward(self, batch):
            self.calls += 1
            rows = batch.rows if isinstance(batch, Texts) else batch["ids"].tolist()
            ids = torch.tensor([sum(map(ord, str(row))) % 16 for row in rows])
            return self.table[ids]

    return Encoder()


def _info_nce(q, p):
    import torch
    return torch.nn.functional.cross_entropy(q @ p.T, torch.arange(len(q)))


TEXTS = [f"text {i}" for i in range(8)]


@needs_torch
def test_split_fn_of_raw_texts_counts_one_row_per_text_before_pass_1() -> None:
    import torch

    from gradcache_torch import cached_step
    encoder = _torch_text_encoder()

    def tokenise_but_drop_the_last(texts, size):
        return [{"ids": torch.arange(start, min(start + size, len(texts) - 1))}
                for start in range(0, len(texts) - 1, size)]

    with pytest.raises(GradCacheError, match=r"split_fn cut group 0 of 8 rows into chunks of "
                                             r"3 \+ 3 \+ 1 = 7 rows"):
        cached_step(encoder, (TEXTS, TEXTS), _info_nce, chunk_size=3,
                    split_fn=tokenise_but_drop_the_last)
    assert encoder.calls == 0 and encoder.table.grad is None


@needs_torch
def test_split_fn_chunks_of_uncountable_rows_are_checked_after_pass_1() -> None:
    from gradcache_torch import cached_step
    encoder = _torch_text_encoder()

    def duplicating(texts, size):
        return [Texts(texts[:5]), Texts(texts[3:])]   # rows 3 and 4 twice

    with pytest.raises(GradCacheError, match=r"group 0 of 8 rows into chunks of 5 \+ 5 = 10 "
                                             r"rows of representations"):
        cached_step(encoder, (TEXTS, TEXTS), _info_nce, chunk_size=4, split_fn=duplicating)
    assert encoder.table.grad is None


@needs_torch
def test_split_fn_rows_are_not_checked_where_they_cannot_be_counted() -> None:
    # a group the core cannot count (a custom object) is the split_fn's business: no false alarm
    from gradcache_torch import cached_step
    encoder = _torch_text_encoder()
    cached_step(encoder, (Texts(TEXTS), Texts(TEXTS)), _info_nce, chunk_size=3,
                split_fn=lambda batch, size: [Texts(batch.rows[i:i + size])
                                              for i in range(0, 8, size)])
    assert encoder.table.grad is not None


def test_countable_rows() -> None:
    from gradcache import _schedule
    from gradcache.testing import NumpyBackend
    backend = NumpyBackend()
    assert _schedule.countable_rows(backend, {"a": np.ones((4, 2)), "b": np.ones(4)}) == 4
    assert _schedule.countable_rows(backend, {"a": np.ones((4, 2)), "b": np.ones(5)}) is None
    assert _schedule.countable_rows(backend, ["a", "b", "c"]) == 3
    assert _schedule.countable_rows(backend, [{"text": "a"}, {"text": "b"}]) is None
    assert _schedule.countable_rows(backend, Texts(TEXTS)) is None


@needs_torch
@pytest.mark.parametrize("entry", ["cached_step", "cached_loss"])
def test_torch_scaler_must_be_a_grad_scaler(entry: str) -> None:
    import torch

    import gradcache_torch
    encoder = torch.nn.Linear(3, 2)
    batch = (torch.randn(4, 3), torch.randn(4, 3))
    message = "scaler must be a torch.amp.GradScaler" if entry == "cached_step" else \
        "cached_loss takes no scaler"
    with pytest.raises(GradCacheError, match=message):
        getattr(gradcache_torch, entry)(encoder, batch, _info_nce, chunk_size=2, scaler=object())
    assert encoder.weight.grad is None


@needs_torch
def test_gradcache_with_one_model_shares_it_among_the_inputs() -> None:
    # GradCache(model) once listed an nn.Sequential's layers as "4 models" for 2 inputs
    import torch

    from gradcache_torch import GradCache, cached_step
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2),
                                torch.nn.Tanh()).double()
    reference = torch.nn.Sequential(*(torch.nn.Linear(3, 4), torch.nn.Tanh(),
                                      torch.nn.Linear(4, 2), torch.nn.Tanh())).double()
    reference.load_state_dict(model.state_dict())
    q, p = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    GradCache(model, chunk_sizes=4, loss_fn=_info_nce)(q, p)
    cached_step([reference, reference], (q, p), _info_nce, chunk_size=4)
    for mine, theirs in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=0, atol=0)


@needs_torch
def test_gradcache_names_what_is_wrong_with_its_models_and_inputs() -> None:
    import torch

    from gradcache_torch import GradCache
    layers = torch.nn.ModuleList([torch.nn.Linear(3, 2) for _ in range(4)])
    q = torch.randn(4, 3)
    with pytest.raises(GradCacheError, match="got 2 model inputs for 4 models: GradCache takes "
                                             "one input per model"):
        GradCache(layers, chunk_sizes=2, loss_fn=_info_nce)(q, q)
    with pytest.raises(GradCacheError, match="models must be a list of models, one per input "
                                             "group .* got int"):
        GradCache(3, chunk_sizes=2, loss_fn=_info_nce)
    with pytest.raises(GradCacheError, match="called with no model inputs"):
        GradCache(layers[0], chunk_sizes=2, loss_fn=_info_nce)()
    with pytest.raises(GradCacheError, match="loss_fn must be callable"):
        GradCache([layers[0]], chunk_sizes=2, loss_fn=None)(q)
    assert all(p.grad is None for p in layers.parameters())


@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="needs jax")
@pytest.mark.parametrize("entry", ["cached_step", "cached_loss"])
def test_jax_loss_taking_params_must_be_callable(entry: str) -> None:
    # the adapter wraps a loss that takes the params; the core checks the wrapped one
    import jax.numpy as jnp

    import gradcache_jax
    params = {"w": jnp.ones((3, 2))}
    batch = (jnp.ones((4, 3)), jnp.ones((4, 3)))

    def encoder(params, x):
        return x @ params["w"]

    with pytest.raises(GradCacheError, match="loss_fn must be callable.*got None"):
        if entry == "cached_step":
            gradcache_jax.cached_step(encoder, batch, None, chunk_size=2, params=params,
                                      loss_takes_params=True)
        else:
            gradcache_jax.cached_loss(encoder, batch, None, chunk_size=2,
                                      loss_takes_params=True)(params)


def test_an_error_in_a_distributed_loss_says_it_ran_on_the_global_batch() -> None:
    # the core's own numpy backend on two thread ranks: the loss sees every rank's rows
    from gradcache import run_cached_step
    from gradcache.testing import LinearEncoder, NumpyBackend, run_ranks

    class Raising:
        def value_and_grad(self, *reps):
            raise ArithmeticError("overflow in the loss")

    rng = np.random.default_rng(0)
    encoder = LinearEncoder(rng.normal(size=(3, 2)))
    batches = [(rng.normal(size=(4 + rank, 3)), rng.normal(size=(4 + rank, 3))) for rank in (0, 1)]

    def rank_step(rank, collective):
        return run_cached_step(NumpyBackend(), encoder, batches[rank], Raising(), chunk_size=2,
                               collective=collective)

    for _, error in run_ranks(2, rank_step, timeout=20):
        assert isinstance(error, ArithmeticError), error
        assert "raised in loss_fn on the global batch (every rank's rows), with representations " \
               "of group 0 (9, 2), group 1 (9, 2)" in "\n".join(error.__notes__)
