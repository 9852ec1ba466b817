"""A failing torch step leaves ``.grad`` exactly as it was -- the same objects, in place -- and a
step that cannot keep that promise is refused before it writes anything.

Each case is one the adversarial pass of issue 13 found: parameters that reentrant checkpointing
hides from the graph walk, ``.grad`` replaced by a new tensor on rollback (code holding the old
objects, or views of one flat buffer as DDP's ``gradient_as_bucket_view`` and ZeRO keep them, saw
the partial sum), a loss that calls ``backward()`` itself, and ``cached_step`` under ``no_grad``.
"""

from __future__ import annotations

import pytest
import torch
import torch.utils.checkpoint as checkpoint

from gradcache import GradCacheError
from gradcache_torch import cached_loss, cached_step


def _loss(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(q @ p.T, dim=1).mean()


def _pair(rows: int = 4, dim: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return (torch.randn(rows, dim, generator=generator, dtype=torch.float64),
            torch.randn(rows, dim, generator=generator, dtype=torch.float64))


def _failing(encoder, at: int, error: type[BaseException] = RuntimeError):
    """``encoder`` as a plain function that raises on its ``at``-th call (both passes counted)."""
    calls = {"n": 0}

    def forward(x: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        out = encoder(x)
        if calls["n"] == at:
            raise error("injected failure")
        return out
    return forward


def _held(parameters) -> list:
    """Each parameter's ``.grad`` object and a copy of its values (``None`` stays ``None``)."""
    return [(p.grad, None if p.grad is None else p.grad.clone()) for p in parameters]


def _assert_as_held(parameters, held) -> None:
    for index, (parameter, (grad, values)) in enumerate(zip(parameters, held)):
        if grad is None:
            assert parameter.grad is None, f"parameter {index}: a gradient appeared"
            continue
        assert parameter.grad is grad, f"parameter {index}: .grad is another tensor"
        assert torch.equal(grad, values), f"parameter {index}: .grad changed"


def _flat_grads(parameters, fill: float = 1.0) -> torch.Tensor:
    """Every ``.grad`` a view into one flat buffer, as DDP's bucket views and ZeRO keep them."""
    parameters = list(parameters)
    flat = torch.full((sum(p.numel() for p in parameters),), fill, dtype=parameters[0].dtype)
    start = 0
    for parameter in parameters:
        parameter.grad = flat[start:start + parameter.numel()].view_as(parameter)
        start += parameter.numel()
    return flat


# -- item 1: reentrant checkpointing in a plain-function encoder -----------------------------------
class _Checkpointed:
    """A plain function (no module to fall back on) whose second layer runs under reentrant
    checkpointing: that layer's parameters are outside the graph the step sees."""

    def __init__(self):
        torch.manual_seed(0)
        self.embed = torch.nn.Linear(4, 4).double()
        self.block = torch.nn.Linear(4, 3).double()

    def parameters(self) -> list:
        return [*self.embed.parameters(), *self.block.parameters()]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.tanh(self.embed(x))
        return checkpoint.checkpoint(self.block, hidden, use_reentrant=True)


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")
# 4 chunks: calls 1-4 are pass 1, 5-7 pass 2 (the first chunk pulled back keeps its pass-1 graph)
@pytest.mark.parametrize("at", [5, 6, 7], ids=["pass-2-first", "pass-2-second", "last-chunk"])
def test_reentrant_checkpoint_in_a_plain_function_is_rolled_back(at: int) -> None:
    model = _Checkpointed()
    model.block.weight.grad = torch.ones_like(model.block.weight)
    held = _held(model.parameters())
    with pytest.raises(RuntimeError, match="injected failure"):
        cached_step(_failing(model, at), _pair(), _loss, chunk_size=2)
    _assert_as_held(model.parameters(), held)


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")
def test_nested_reentrant_checkpoints_are_rolled_back() -> None:
    model = _Checkpointed()
    inner = model.block

    def outer(hidden: torch.Tensor) -> torch.Tensor:
        return checkpoint.checkpoint(inner, torch.tanh(hidden), use_reentrant=True)

    def encoder(x: torch.Tensor) -> torch.Tensor:
        return checkpoint.checkpoint(outer, model.embed(x), use_reentrant=True)

    held = _held(model.parameters())
    with pytest.raises(RuntimeError, match="injected failure"):
        cached_step(_failing(encoder, 7), _pair(), _loss, chunk_size=2)
    _assert_as_held(model.parameters(), held)


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")
def test_reentrant_checkpoint_gradients_are_still_exact() -> None:
    model = _Checkpointed()
    q, p = _pair()
    cached_step(model, (q, p), _loss, chunk_size=2)
    cached = [param.grad.clone() for param in model.parameters()]
    for param in model.parameters():
        param.grad = None
    _loss(model(q), model(p)).backward()
    for got, want in zip(cached, model.parameters()):
        torch.testing.assert_close(got, want.grad, rtol=1e-10, atol=1e-12)


# -- item 2: in place, the same objects ------------------------------------------------------------
@pytest.mark.parametrize("entry", ["cached_step", "cached_loss"])
@pytest.mark.parametrize("at", [2, 6, 7], ids=["pass-1", "pass-2", "last-chunk"])
def test_rollback_restores_the_same_grad_objects_in_place(entry: str, at: int) -> None:
    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(),
                                  torch.nn.Linear(4, 3)).double()
    params = list(encoder.parameters())
    params[0].grad = torch.full_like(params[0], 2.0)   # held gradients and None, mixed
    params[2].grad = torch.full_like(params[2], -1.0)
    held = _held(params)
    with pytest.raises(RuntimeError, match="injected failure"):
        if entry == "cached_step":
            cached_step(_failing(encoder, at), _pair(), _loss, chunk_size=2)
        else:
            cached_loss(_failing(encoder, at), _pair(), _loss, chunk_size=2).backward()
    _assert_as_held(params, held)


@pytest.mark.parametrize("entry", ["cached_step", "cached_loss"])
def test_rollback_restores_views_of_one_flat_buffer(entry: str) -> None:
    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(),
                                  torch.nn.Linear(4, 3)).double()
    scale = torch.nn.Parameter(torch.tensor(2.0, dtype=torch.float64))
    params = [*encoder.parameters(), scale]
    flat = _flat_grads(params, fill=0.5)
    before, held = flat.clone(), _held(params)

    def loss(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return _loss(scale * q, p)

    with pytest.raises(RuntimeError, match="injected failure"):
        if entry == "cached_step":
            cached_step(_failing(encoder, 7), _pair(), loss, chunk_size=2)
        else:
            cached_loss(_failing(encoder, 7), _pair(), loss, chunk_size=2).backward()
    assert torch.equal(flat, before), "the flat gradient buffer kept a partial sum"
    _assert_as_held(params, held)


@pytest.mark.parametrize("entry", ["cached_step", "cached_loss"])
def test_a_successful_step_accumulates_into_the_same_grad_objects(entry: str) -> None:
    torch.manual_seed(0)
    encoder = torch.nn.Linear(4, 3).double()
    scale = torch.nn.Parameter(torch.tensor(2.0, dtype=torch.float64))
    params = [*encoder.parameters(), scale]
    flat = _flat_grads(params, fill=0.5)
    held = [p.grad for p in params]

    def loss(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return _loss(scale * q, p)

    q, p = _pair()
    if entry == "cached_step":
        cached_step(encoder, (q, p), loss, chunk_size=2)
    else:
        cached_loss(encoder, (q, p), loss, chunk_size=2).backward()
    assert all(param.grad is grad for param, grad in zip(params, held))
    written = flat.clone()
    flat.fill_(0.5)
    for param in params:
        param.grad = None
    loss(encoder(q), encoder(p)).backward()
    expected = torch.cat([param.grad.reshape(-1) for param in params]) + 0.5
    torch.testing.assert_close(written, expected, rtol=1e-10, atol=1e-12)


@pytest.fixture
def single_rank_group():
    """A one-rank gloo group in this process (no subprocess), torn down afterwards."""
    import torch.distributed as dist
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("at", [3, 8], ids=["pass-1", "last-chunk"])
def test_ddp_bucket_view_gradients_are_restored_in_place(single_rank_group, at: int) -> None:
    from torch.nn.parallel import DistributedDataParallel
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(),
                              torch.nn.Linear(4, 3)).double()
    model = DistributedDataParallel(net, gradient_as_bucket_view=True)
    q, p = _pair()
    for _ in range(2):   # DDP rebuilds its buckets after the first step; .grad are bucket views
        _loss(model(q), model(p)).backward()
    params = list(net.parameters())
    assert all(param.grad._base is not None for param in params)
    held = [param.grad for param in params]
    cached_step(model, (q, p), _loss, chunk_size=2)
    assert all(param.grad is grad for param, grad in zip(params, held))
    held = _held(params)
    with pytest.raises(RuntimeError, match="injected failure"):
        cached_step(_failing(model, at), (q, p), _loss, chunk_size=2)
    _assert_as_held(params, held)


# -- item 5: a loss that runs backward itself ------------------------------------------------------
@pytest.mark.parametrize("entry", ["cached_step", "cached_loss"])
@pytest.mark.parametrize("retain_graph", [False, True])
def test_a_loss_that_calls_backward_is_refused_before_it_writes(entry: str,
                                                                retain_graph: bool) -> None:
    torch.manual_seed(0)
    encoder = torch.nn.Linear(4, 3).double()
    scale = torch.nn.Parameter(torch.tensor(2.0, dtype=torch.float64))
    scale.grad = torch.tensor(5.0, dtype=torch.float64)
    params = [*encoder.parameters(), scale]
    held = _held(params)

    def loss(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        value = _loss(scale * q, p)
        value.backward(retain_graph=retain_graph)
        return value

    with pytest.raises(GradCacheError, match=r"loss calls backward\(\)"):
        if entry == "cached_step":
            cached_step(encoder, _pair(), loss, chunk_size=2)
        else:
            cached_loss(encoder, _pair(), loss, chunk_size=2).backward()
    _assert_as_held(params, held)


def test_the_backward_guard_is_in_place_only_while_a_loss_runs_and_only_for_its_thread() -> None:
    # the guard replaces what torch's backward runs while a loss runs: afterwards it is the
    # original again, and a backward in another thread meanwhile is not refused
    import threading

    from gradcache_torch._backend import _backward_entries
    entries = [(owner, name) for owner, name, _ in _backward_entries()]
    originals = [getattr(owner, name) for owner, name in entries]
    other: list = []

    def loss(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        assert all(getattr(owner, name) is not original
                   for (owner, name), original in zip(entries, originals))
        x = torch.ones(2, requires_grad=True)

        def elsewhere() -> None:
            x.sum().backward()
            other.append(x.grad.clone())
        thread = threading.Thread(target=elsewhere)
        thread.start()
        thread.join()
        return _loss(q, p)

    cached_step(torch.nn.Linear(4, 3).double(), _pair(), loss, chunk_size=2)
    assert [getattr(owner, name) for owner, name in entries] == originals
    assert len(other) == 1 and torch.equal(other[0], torch.ones(2))


# -- silently accepted: cached_step with gradients off ---------------------------------------------
@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_cached_step_with_gradients_off_is_refused_before_anything_runs(context) -> None:
    torch.manual_seed(0)
    encoder = torch.nn.Linear(4, 3).double()
    encoder.weight.grad = torch.ones_like(encoder.weight)
    held = _held(encoder.parameters())
    calls = []

    def counting(x: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return encoder(x)

    name = "inference_mode" if context is torch.inference_mode else "no_grad"
    with pytest.raises(GradCacheError, match=rf"torch\.{name}\(\).*writes gradients.*cached_loss"):
        with context():
            cached_step(counting, _pair(), _loss, chunk_size=2)
    assert not calls, "the encoder ran"
    _assert_as_held(encoder.parameters(), held)


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_cached_loss_with_gradients_off_takes_the_loss_and_writes_nothing(context) -> None:
    torch.manual_seed(0)
    encoder = torch.nn.Linear(4, 3).double()
    encoder.weight.grad = torch.ones_like(encoder.weight)
    held = _held(encoder.parameters())
    q, p = _pair()
    with context():
        value = cached_loss(encoder, (q, p), _loss, chunk_size=2)
        expected = _loss(encoder(q), encoder(p))
    assert not value.requires_grad
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=0)
    _assert_as_held(encoder.parameters(), held)
