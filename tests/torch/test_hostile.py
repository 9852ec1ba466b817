"""Hostile calls that broke issue 13's promises on torch after its fixes: a failing step leaves
every ``.grad`` as it was, a wrong call never returns normally, and a bad configuration is refused
before any gradient is touched.

Each test is one case the adversarial pass found: code that writes ``.grad`` outside the step's
own backward (an encoder or a loss module that zeroes its gradients, an auxiliary ``backward()``
in a forward, a backward through an alias the guard did not see), a gradient-cached loss nested in
another step's loss, ``.grad`` objects that cannot be written in place or are shared by two
parameters, sparse gradients in the step's own DDP average, and losses that read no
representation at all. The two-process cases (a bad option on one rank, a Ctrl-C inside an
agreement) are in ``test_ddp.py``'s launched pair.
"""

from __future__ import annotations

import pytest
import torch

from gradcache import GradCacheError
from gradcache_torch import cached_loss, cached_step
from tests.torch.test_rollback import _assert_as_held, _held, _loss, _pair, single_rank_group

__all__ = ["single_rank_group"]   # a fixture, used by name


def _tower(seed: int = 0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(),
                               torch.nn.Linear(4, 3)).double()


def _primed(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The module's parameters, every other one holding a gradient (the rest ``None``)."""
    params = list(module.parameters())
    for index, parameter in enumerate(params):
        if index % 2 == 0:
            parameter.grad = torch.full_like(parameter, 3.0)
    return params


class _Meddling(torch.nn.Module):
    """A tower whose forward does something to its own gradients on its ``at``-th call and
    raises on its ``fail_at``-th (both passes counted)."""

    def __init__(self, meddle, at: int, fail_at: int):
        super().__init__()
        self.tower = _tower()
        self.meddle, self.at, self.fail_at, self.calls = meddle, at, fail_at, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        out = self.tower(x)
        if self.calls == self.at:
            self.meddle(self, out)
        if self.calls == self.fail_at:
            raise RuntimeError("injected failure")
        return out


def _zero_grad(module: torch.nn.Module, out: torch.Tensor) -> None:
    module.zero_grad(set_to_none=True)


def _add_into_grad(module: torch.nn.Module, out: torch.Tensor) -> None:
    for parameter in module.parameters():
        if parameter.grad is not None:
            parameter.grad.add_(100.0)


@pytest.mark.parametrize("meddle", [_zero_grad, _add_into_grad], ids=["zero_grad", "add_"])
@pytest.mark.parametrize("entry", ["cached_step", "cached_loss"])
def test_a_module_encoder_that_touches_its_own_grad_is_rolled_back(meddle, entry: str) -> None:
    # the module's parameters are remembered before anything runs, not when pass 2 reaches them;
    # cached_loss's promise starts at its backward, so the meddling happens in pass 2 there
    model = _Meddling(meddle, at=1 if entry == "cached_step" else 5, fail_at=7)
    params = _primed(model)
    held = _held(params)
    with pytest.raises(RuntimeError, match="injected failure"):
        if entry == "cached_step":
            cached_step(model, _pair(), _loss, chunk_size=2)
        else:
            cached_loss(model, _pair(), _loss, chunk_size=2).backward()
    _assert_as_held(params, held)


def test_a_loss_module_that_zeroes_its_own_grad_is_rolled_back() -> None:
    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.tensor(2.0, dtype=torch.float64))

        def forward(self, q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
            self.zero_grad(set_to_none=True)
            return _loss(self.scale * q, p)

    loss = Scaled()
    loss.scale.grad = torch.tensor(5.0, dtype=torch.float64)
    model = _Meddling(lambda module, out: None, at=0, fail_at=7)
    held = _held([loss.scale])
    with pytest.raises(RuntimeError, match="injected failure"):
        cached_step(model, _pair(), loss, chunk_size=2)
    _assert_as_held([loss.scale], held)


def _aux_backward(module: torch.nn.Module, out: torch.Tensor) -> None:
    out.pow(2).sum().backward(retain_graph=True)


@pytest.mark.parametrize("encoder_kind", ["module", "function"])
def test_an_encoder_that_calls_backward_is_refused_before_it_writes(encoder_kind: str) -> None:
    model = _Meddling(_aux_backward, at=5, fail_at=0)
    params = _primed(model)
    held = _held(params)
    encoder = model if encoder_kind == "module" else (lambda x: model(x))
    with pytest.raises(GradCacheError, match=r"encoder calls backward\(\)"):
        cached_step(encoder, _pair(), _loss, chunk_size=2)
    _assert_as_held(params, held)


def test_a_loss_calling_backward_through_an_alias_is_refused() -> None:
    from torch.autograd import backward as imported_backward  # bound before any step ran
    model = _tower()
    scale = torch.nn.Parameter(torch.tensor(2.0, dtype=torch.float64))
    scale.grad = torch.tensor(5.0, dtype=torch.float64)
    held = _held([scale, *model.parameters()])

    def loss(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        value = _loss(scale * q, p)
        imported_backward(value, retain_graph=True)
        return value

    with pytest.raises(GradCacheError, match=r"loss calls backward\(\)"):
        cached_step(model, _pair(), loss, chunk_size=2)
    _assert_as_held([scale, *model.parameters()], held)


def test_the_guard_lets_torch_autograd_grad_through() -> None:
    # a gradient penalty in the loss differentiates without writing .grad: allowed, and exact
    model = _tower()
    q, p = _pair()

    def penalised(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        value = _loss(a, b)
        (grad,) = torch.autograd.grad(value, a, create_graph=True)
        return value + grad.pow(2).sum()

    cached_step(model, (q, p), penalised, chunk_size=2)
    cached = [param.grad.clone() for param in model.parameters()]
    model.zero_grad(set_to_none=True)
    penalised(model(q), model(p)).backward()
    for got, param in zip(cached, model.parameters()):
        torch.testing.assert_close(got, param.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("inner", ["cached_step", "cached_loss"])
@pytest.mark.parametrize("outer", ["cached_step", "cached_loss"])
def test_a_cached_step_nested_in_a_loss_is_refused(inner: str, outer: str) -> None:
    # the inner step's pass 2 would write its encoder's .grad outside the outer step's rollback
    model, other = _tower(), _tower(1)
    params = [*_primed(model), *_primed(other)]
    held = _held(params)

    def loss(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        nested = cached_step if inner == "cached_step" else cached_loss
        return _loss(q, p) + nested(other, _pair(), _loss, chunk_size=2)

    with pytest.raises(GradCacheError, match=rf"{inner} was called inside the loss of another"):
        if outer == "cached_step":
            cached_step(model, _pair(), loss, chunk_size=2)
        else:
            cached_loss(model, _pair(), loss, chunk_size=2).backward()
    _assert_as_held(params, held)


def test_a_nested_evaluation_loss_is_allowed() -> None:
    # under no_grad the inner cached_loss writes nothing: nothing to roll back
    model, other = _tower(), _tower(1)

    def loss(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            monitored = cached_loss(other, _pair(), _loss, chunk_size=2)
        return _loss(q, p) + 0 * monitored

    cached_step(model, _pair(), loss, chunk_size=2)
    assert all(param.grad is None for param in other.parameters())


def test_a_grad_that_cannot_be_written_in_place_does_not_stop_the_restore() -> None:
    # an expanded (stride-0) .grad makes backward fail; every other .grad must still come back
    model = _tower()
    params = list(model.parameters())
    params[0].grad = torch.full((1, 1), 2.0, dtype=torch.float64).expand(params[0].shape)
    params[2].grad = torch.full_like(params[2], 3.0)
    held = _held(params)
    with pytest.raises(RuntimeError):
        cached_step(model, _pair(), _loss, chunk_size=2)
    _assert_as_held(params, held)


def test_one_grad_object_shared_by_two_parameters_is_restored() -> None:
    torch.manual_seed(0)
    first, second = torch.nn.Linear(4, 3).double(), torch.nn.Linear(4, 3).double()
    shared = torch.ones_like(first.weight)
    first.weight.grad = second.weight.grad = shared
    calls = {"second": 0}

    def second_encoder(x: torch.Tensor) -> torch.Tensor:   # plain functions: no module to protect
        calls["second"] += 1
        if calls["second"] == 4:    # pass 2's second chunk of the second group
            raise RuntimeError("injected failure")
        return second(x)

    held = _held([first.weight, second.weight])
    with pytest.raises(RuntimeError, match="injected failure"):
        cached_step([lambda x: first(x), second_encoder], _pair(), _loss, chunk_size=2)
    _assert_as_held([first.weight, second.weight], held)


class Bag(torch.nn.Module):
    """An embedding bag with sparse gradients (shared with test_ddp.py's two-rank cases)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embedding = torch.nn.Embedding(20, 4, sparse=True).double()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(ids).mean(1)


def _ids() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return (torch.randint(0, 20, (4, 3), generator=generator),
            torch.randint(0, 20, (4, 3), generator=generator))


@pytest.mark.parametrize("wrapped", ["ddp", "distributed"])
def test_sparse_gradients_are_averaged_by_the_step(single_rank_group, wrapped: str) -> None:
    # DDP supports sparse gradients (nn.Embedding(sparse=True)); so must the step's own average
    from torch.nn.parallel import DistributedDataParallel
    bag = Bag()
    q, p = _ids()
    if wrapped == "ddp":
        cached_step(DistributedDataParallel(bag), (q, p), _loss, chunk_size=2)
    else:
        cached_step(bag, (q, p), _loss, chunk_size=2, distributed=True)
    cached = bag.embedding.weight.grad
    assert cached.is_sparse
    bag.embedding.weight.grad = None
    _loss(bag(q), bag(p)).backward()
    torch.testing.assert_close(cached.to_dense(), bag.embedding.weight.grad.to_dense(),
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("loss", [
    lambda q, p: _loss(q, p).detach().requires_grad_(),
    lambda q, p: _loss(q.data, p.data) * _SCALE,
    lambda q, p: 3.0 * _SCALE,
], ids=["detached-then-requires-grad", "through-data", "parameter-only"])
@pytest.mark.parametrize("entry", ["cached_step", "cached_loss"])
def test_a_loss_that_reads_no_representation_is_refused(loss, entry: str) -> None:
    # loss.backward() would leave the encoders' .grad None; the step wrote zeros into them
    model = _tower()
    params = [*_primed(model), _SCALE]
    held = _held(params)
    with pytest.raises(GradCacheError, match="does not depend on the representations"):
        if entry == "cached_step":
            cached_step(model, _pair(), loss, chunk_size=2)
        else:
            cached_loss(model, _pair(), loss, chunk_size=2).backward()
    _assert_as_held(params, held)


_SCALE = torch.nn.Parameter(torch.tensor(2.0, dtype=torch.float64))
