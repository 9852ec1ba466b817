"""The first chunk's graph kept from pass 1 (issue 14): one encoder call fewer, gradients unchanged.

``gradcache_torch`` encodes the first chunk that pass 2 pulls back with its graph in pass 1 and
pulls back through it (first) instead of re-encoding it. These tests count the encoder's calls
where it applies and where it must not (``check_determinism``, a frozen first group, an initialised
process group, an evaluation), check the gradients against the full batch with dropout (the kept
chunk's randomness is pass 1's own), and check that the graph is let go at pass 2's first pullback.
"""

from __future__ import annotations

import gc
import weakref
from typing import Any

import pytest
import torch

from gradcache import GradCacheError, cached_backward, cached_forward
from gradcache_torch import TorchBackend, cached_loss, cached_step


def _loss(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    scores = q @ p.T
    return torch.nn.functional.cross_entropy(scores, torch.arange(len(q)))


class Counted(torch.nn.Module):
    """A small encoder with dropout that counts its calls and the calls made with a graph."""

    def __init__(self, dropout: float = 0.0, requires_grad: bool = True):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(),
                                       torch.nn.Dropout(dropout), torch.nn.Linear(8, 3)).double()
        self.net.requires_grad_(requires_grad)
        self.calls = 0
        self.with_graph = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.with_graph += torch.is_grad_enabled()
        return self.net(x)


def _pair(rows: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return tuple(torch.randn(rows, 4, generator=generator, dtype=torch.float64) for _ in range(2))


@pytest.mark.parametrize("entry", ["cached_step", "cached_loss"])
def test_one_chunk_is_encoded_once_and_gradients_match_the_full_batch(entry: str) -> None:
    encoder = Counted(dropout=0.3)
    q, p = _pair()
    torch.manual_seed(5)
    if entry == "cached_step":
        loss = cached_step(encoder, (q, p), _loss, chunk_size=2)
    else:
        loss = cached_loss(encoder, (q, p), _loss, chunk_size=2)
        loss.backward()
    # 3 chunks per group: 6 calls in pass 1, 5 in pass 2 (the first chunk's graph was kept)
    assert (encoder.calls, encoder.with_graph) == (11, 6)
    cached = [param.grad.clone() for param in encoder.parameters()]

    # the full batch, chunk by chunk with a graph, under the same random stream in the same
    # order as pass 1 drew it (dropout masks per chunk)
    encoder.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    reps = [torch.cat([encoder(chunk) for chunk in group.split(2)]) for group in (q, p)]
    expected = _loss(*reps)
    expected.backward()
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-12, atol=0)
    for got, param in zip(cached, encoder.parameters()):
        torch.testing.assert_close(got, param.grad, rtol=1e-10, atol=1e-12)


def test_check_determinism_re_encodes_every_chunk() -> None:
    encoder = Counted()
    cached_step(encoder, _pair(), _loss, chunk_size=2, check_determinism=True)
    assert encoder.calls == 12   # kept, the first chunk would be compared with itself


def test_a_frozen_first_group_keeps_the_first_trained_group_s_chunk() -> None:
    frozen, trained = Counted(requires_grad=False), Counted()
    cached_step([frozen, trained], _pair(), _loss, chunk_size=2)
    assert (frozen.calls, frozen.with_graph) == (3, 0)
    assert (trained.calls, trained.with_graph) == (5, 3)


def test_evaluation_keeps_no_graph() -> None:
    encoder = Counted()
    with torch.no_grad():
        cached_loss(encoder, _pair(), _loss, chunk_size=2)
    assert (encoder.calls, encoder.with_graph) == (6, 0)


def test_the_kept_graph_is_let_go_at_pass_two_and_on_release() -> None:
    encoder = Counted()
    forward = cached_forward(TorchBackend(), encoder, _pair(), _loss, chunk_size=2)
    assert forward.kept is not None and forward.kept.rep.requires_grad
    cached_backward(forward)
    assert forward.kept is None and encoder.calls == 11
    forward = cached_forward(TorchBackend(), encoder, _pair(), _loss, chunk_size=2)
    forward.close()   # released without a backward: the graph goes too
    assert forward.kept is None


def test_with_a_process_group_every_chunk_is_re_encoded() -> None:
    import torch.distributed as dist
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        encoder = Counted()
        cached_step(encoder, _pair(), _loss, chunk_size=2)
    finally:
        dist.destroy_process_group()
    # a forward may take part in DDP's or FSDP2's synchronisation: each stays by its backward
    assert encoder.calls == 12


# -- a later forward modifies in place a tensor the kept graph saved --------------------------------
class _BufferInPlace(torch.nn.Module):
    """Updates a buffer in place in every forward and multiplies by it (so the graph saves it)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Linear(4, 3).double()
        self.register_buffer("scale", torch.ones(3, dtype=torch.float64))
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        with torch.no_grad():
            self.scale.mul_(1.0)   # an in-place update (a running statistic) that keeps the value
        return self.net(x) * self.scale


class _TiedMaxNorm(torch.nn.Module):
    """nn.Embedding with max_norm renormalises its weight in place in every forward; the weight is
    also used in a product that saves it (tied output scores)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embedding = torch.nn.Embedding(10, 4, max_norm=1.0).double()
        self.calls = 0

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        pooled = self.embedding(ids).mean(1)
        return (pooled @ self.embedding.weight.T)[:, :3]


@pytest.mark.parametrize("make", [_BufferInPlace, _TiedMaxNorm], ids=["buffer", "max-norm"])
def test_a_saved_tensor_modified_in_place_later_re_encodes_the_kept_chunk(
        make: type) -> None:
    # torch would refuse the kept graph's backward ("modified by an inplace operation"), where
    # the step without a kept graph runs: pass 2 re-encodes that chunk instead
    if make is _TiedMaxNorm:
        generator = torch.Generator().manual_seed(2)
        batch = tuple(torch.randint(0, 10, (6, 5), generator=generator) for _ in range(2))
    else:
        batch = _pair()
    encoder = make()
    loss = cached_step(encoder, batch, _loss, chunk_size=2)
    assert encoder.calls == 12
    kept = [param.grad.clone() for param in encoder.parameters()]

    plain = make()
    expected = cached_step(plain, batch, _loss, chunk_size=2, keep_first_graph=False)
    assert torch.equal(loss, expected)
    for got, param in zip(kept, plain.parameters()):
        assert torch.equal(got, param.grad)


def test_under_the_caller_s_saved_tensor_hooks_no_graph_is_kept() -> None:
    # save_on_cpu (offloading) packs every saved tensor as before: the chunk is re-encoded
    encoder = Counted()
    with torch.autograd.graph.save_on_cpu():
        cached_step(encoder, _pair(), _loss, chunk_size=2)
    assert encoder.calls == 12


def test_batch_norm_statistics_are_updated_once_fewer() -> None:
    # documented: the kept chunk's forward runs once, so a running statistic sees it once
    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8),
                                  torch.nn.Linear(8, 3)).double()
    cached_step(encoder, _pair(), _loss, chunk_size=2)
    assert int(encoder[1].num_batches_tracked) == 11   # 6 chunks in pass 1, 5 in pass 2


# -- the kept graph is let go on every way out ---------------------------------------------------------
class _Probe:
    """Lives as long as the graph of the forward that made it (held by an autograd node)."""


class _Tagged(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, probe: _Probe) -> torch.Tensor:
        ctx.probe = probe
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class _Probed(Counted):
    """Counted, whose forwards with a graph leave a weak reference to a probe their graph holds;
    its ``fail_at``-th call raises."""

    def __init__(self, fail_at: int = 0):
        super().__init__()
        self.probes: list[weakref.ref] = []
        self.fail_at = fail_at

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output = super().forward(x)
        if self.calls == self.fail_at:
            raise RuntimeError("encoder fault")
        if torch.is_grad_enabled():
            probe = _Probe()
            self.probes.append(weakref.ref(probe))
            output = _Tagged.apply(output, probe)
        return output


def test_a_failure_after_the_kept_chunk_lets_its_graph_go_while_the_error_is_held() -> None:
    encoder = _Probed(fail_at=2)   # pass 1's second chunk, after the kept one
    with pytest.raises(RuntimeError, match="encoder fault") as caught:
        cached_step(encoder, _pair(), _loss, chunk_size=2)
    gc.collect()
    assert caught.value is not None and len(encoder.probes) == 1
    assert encoder.probes[0]() is None   # the traceback's frames no longer hold the graph


def test_a_bad_upstream_releases_the_forward() -> None:
    encoder = _Probed()
    forward = cached_forward(TorchBackend(), encoder, _pair(), _loss, chunk_size=2)
    with pytest.raises(GradCacheError, match="upstream must be a scalar"):
        cached_backward(forward, upstream=torch.ones(2))
    gc.collect()
    assert forward.kept is None and encoder.probes[0]() is None


@pytest.mark.parametrize("entry", ["cached_step", "cached_loss"])
def test_keep_first_graph_false_re_encodes_every_chunk_with_the_same_gradients(entry: str) -> None:
    # the opt-out: CUDA-graphed encoders (their backward reads buffers a later forward refills)
    # or a loss whose peak memory must not hold one chunk's activations
    results = []
    for keep in (True, False):
        encoder = Counted(dropout=0.3)
        torch.manual_seed(5)
        if entry == "cached_step":
            cached_step(encoder, _pair(), _loss, chunk_size=2, keep_first_graph=keep)
        else:
            cached_loss(encoder, _pair(), _loss, chunk_size=2, keep_first_graph=keep).backward()
        results.append((encoder.calls, [p.grad.clone() for p in encoder.parameters()]))
    assert [calls for calls, _ in results] == [11, 12]
    for kept, re_encoded in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(kept, re_encoded, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("entry", ["cached_step", "cached_loss"])
def test_keep_first_graph_must_be_a_bool(entry: str) -> None:
    encoder = Counted()
    step = cached_step if entry == "cached_step" else cached_loss
    with pytest.raises(GradCacheError, match="keep_first_graph must be True or False"):
        step(encoder, _pair(), _loss, chunk_size=2, keep_first_graph="no")
    assert encoder.calls == 0


def test_a_failing_representation_check_on_the_kept_chunk_lets_the_graph_go() -> None:
    class Short(_Probed):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x)[:1]   # one row for a chunk of two: refused after encoding

    encoder = Short()
    with pytest.raises(GradCacheError, match="one row per input row") as caught:
        cached_step(encoder, _pair(), _loss, chunk_size=2)
    gc.collect()
    assert caught.value is not None and len(encoder.probes) == 1
    assert encoder.probes[0]() is None   # the traceback's frames no longer hold the graph
