"""What an adversarial pass over ``cached_loss`` found, each now a clear error instead of a silently
wrong gradient: inputs that require grad, inputs changed in place or parameters replaced between the
call and its backward, and a loss that returns a tensor without a graph."""

from __future__ import annotations

import pytest
import torch

from gradcache import GradCacheError
from gradcache_torch import cached_loss, cached_step


def _info_nce(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(q @ p.T, torch.arange(len(q)))


def _problem():
    torch.manual_seed(0)
    encoder = torch.nn.Linear(4, 3).double()
    return encoder, torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)


def test_inputs_that_require_grad_are_refused() -> None:
    encoder, q, p = _problem()
    q.requires_grad_()
    with pytest.raises(GradCacheError, match="input tensor requires grad"):
        cached_loss(encoder, (q, p), _info_nce, chunk_size=2)


def test_an_input_changed_in_place_before_backward_is_an_error() -> None:
    encoder, q, p = _problem()
    loss = cached_loss(encoder, (q, p), _info_nce, chunk_size=2)
    q.mul_(2)
    with pytest.raises(GradCacheError, match="input tensor .* modified in place"):
        loss.backward()
    assert encoder.weight.grad is None


def test_a_replaced_parameter_before_backward_is_an_error() -> None:
    encoder, q, p = _problem()
    loss = cached_loss(encoder, (q, p), _info_nce, chunk_size=2)
    encoder.weight = torch.nn.Parameter(encoder.weight.detach() + 1)
    with pytest.raises(GradCacheError, match="parameter of Linear was replaced"):
        loss.backward()
    assert encoder.bias.grad is None


@pytest.mark.parametrize("entry", ["cached_loss", "cached_step"])
def test_a_loss_without_a_graph_is_an_error(entry) -> None:
    encoder, q, p = _problem()

    def detached(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return _info_nce(a.detach(), b.detach())

    with pytest.raises(GradCacheError, match="does not depend on the representations"):
        if entry == "cached_loss":
            cached_loss(encoder, (q, p), detached, chunk_size=2).backward()
        else:
            cached_step(encoder, (q, p), detached, chunk_size=2)
    assert encoder.weight.grad is None
