"""Tiled losses in PyTorch: equal to the dense ones, alone and as the loss of ``cached_step``."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings

from gradcache import GradCacheError
from gradcache.testing import examples
from tests.losses.common import Case, assert_same, cases, check_drawn, default_params

torch = pytest.importorskip("torch")
losses = pytest.importorskip("gradcache_torch.losses")
from gradcache_torch import cached_step  # noqa: E402


def evaluate(case: Case, dense: bool, dtype: torch.dtype = torch.float64) -> dict:
    """Value and every gradient (representations and parameters), as numpy."""
    x, y = (torch.tensor(a, dtype=dtype, requires_grad=True) for a in case.data())
    params = {k: torch.tensor(v, dtype=dtype, requires_grad=True) for k, v in case.params.items()}
    if dense:
        loss = getattr(losses, f"{case.loss}_dense")(x, y, similarity=case.similarity, **params)
    else:
        loss = getattr(losses, case.loss)(x, y, similarity=case.similarity, tile_size=case.tile,
                                          **params)
    loss.backward()
    out = {"loss": loss.detach().numpy(), "x": x.grad.numpy(), "y": y.grad.numpy()}
    out.update({k: v.grad.numpy() for k, v in params.items()})
    return out


@settings(max_examples=examples(120), deadline=None)
@given(case=cases())
def test_tiled_equals_dense(case):
    check_drawn(evaluate(case, dense=False), evaluate(case, dense=True))


@pytest.mark.parametrize("loss", ["info_nce", "clip_loss", "siglip_loss"])
def test_float32_and_fixed_parameters(loss):
    case = Case(loss, rows=37, negatives=2 if loss == "info_nce" else 0, dim=16, tile=8,
                similarity="cosine", params=default_params(loss), seed=3)
    tiled, dense = evaluate(case, False, torch.float32), evaluate(case, True, torch.float32)
    assert_same(tiled, dense, tolerance=1e-5)
    x, y = (torch.tensor(a) for a in case.data())
    fixed = getattr(losses, loss)(x, y, tile_size=8, similarity="cosine", **default_params(loss))
    assert abs(float(fixed) - float(dense["loss"])) <= 1e-5 * abs(float(dense["loss"]))


def test_half_precision_inputs_are_computed_in_float32():
    x, y = torch.randn(9, 8).bfloat16().requires_grad_(), torch.randn(9, 8).bfloat16()
    loss = losses.clip_loss(x, y, tile_size=4)
    assert loss.dtype == torch.float32
    loss.backward()
    assert x.grad.dtype == torch.bfloat16


class Tower(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(6, 4, dtype=torch.float64)

    def forward(self, x):
        return torch.tanh(self.layer(x))


class Learnable(torch.nn.Module):
    """A loss owning its parameters, as a user would write it."""

    def __init__(self, loss: str, dense: bool, tile: int):
        super().__init__()
        self.fn = getattr(losses, f"{loss}_dense" if dense else loss)
        self.extra = {} if dense else {"tile_size": tile}
        self.params = torch.nn.ParameterDict(
            {k: torch.nn.Parameter(torch.tensor(v, dtype=torch.float64))
             for k, v in default_params(loss).items()})

    def forward(self, x, y):
        return self.fn(x, y, **self.params, **self.extra)


@pytest.mark.parametrize("loss", ["info_nce", "clip_loss", "siglip_loss"])
def test_cached_step_with_tiled_loss_equals_a_full_batch_dense_step(loss):
    rng = np.random.default_rng(0)
    rows, group = 11, (3 if loss == "info_nce" else 1)
    queries = torch.tensor(rng.normal(size=(rows, 6)))
    passages = torch.tensor(rng.normal(size=(rows * group, 6)))
    results = []
    for dense in (False, True):
        torch.manual_seed(0)
        towers = [Tower(), Tower()]
        loss_fn = Learnable(loss, dense, tile=4)
        if dense:
            value = loss_fn(towers[0](queries), towers[1](passages))
            value.backward()
        else:
            value = cached_step(towers, (queries, passages), loss_fn, chunk_size=4)
        grads = {f"{i}.{name}": p.grad.numpy() for i, t in enumerate(towers)
                 for name, p in t.named_parameters()}
        grads.update({name: p.grad.numpy() for name, p in loss_fn.params.items()})
        results.append({"loss": value.detach().numpy(), **grads})
    assert_same(*results, tolerance=1e-10)


def test_errors_name_the_shapes():
    with pytest.raises(GradCacheError, match=r"a multiple of 4"):
        losses.info_nce(torch.randn(4, 3), torch.randn(6, 3))
    with pytest.raises(GradCacheError, match=r"similarity must be one of"):
        losses.clip_loss(torch.randn(4, 3), torch.randn(4, 3), similarity="l2")
    with pytest.raises(GradCacheError, match=r"tile_size"):
        losses.siglip_loss(torch.randn(4, 3), torch.randn(4, 3), tile_size=0)
