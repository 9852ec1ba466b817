"""DDP on two gloo ranks (127.0.0.1): exact gradients, and failures that end at once with every
``.grad`` as it was.

Each rank's loss on its own rows (no ``distributed=``) gives DDP's average, one all-reduce per
step: the step's own average after the ranks' one agreement by default (added into DDP's bucket
views with ``gradient_as_bucket_view=True``), DDP's reducer where a comm hook is registered, none
under ``no_sync``.

Failures, ``cached_step`` and ``cached_loss`` alike: a rank whose final gradient all-reduce fails
after the last agreement, or a rank absent from it; a ``KeyboardInterrupt`` on one rank, with the
training loop going on; ranks out of step; DDP without ``distributed=`` with a rank raising in
pass 2, which would otherwise leave the other waiting in DDP's all-reduce until the timeout. "As it
was" means the same ``.grad`` objects (views of DDP's flat buckets) with the same values; a rank
that succeeds accumulates into those objects. One launched pair runs everything (a process start
costs seconds).
"""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

from gradcache import Rendezvous
from gradcache_cli.spawn import spawn
from gradcache_torch import TorchCollective, cached_loss, cached_step
from gradcache_torch._distributed import GradientSync
from tests.torch.test_distributed import counting, global_reference
from tests.torch.test_distributed import local_batch as rank_batch
from tests.torch.test_features import Tower, info_nce

pytestmark = pytest.mark.slow

WORLD = 2


def local_batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + rank)
    return (torch.randn(10, 6, generator=generator, dtype=torch.float64),
            torch.randn(10, 6, generator=generator, dtype=torch.float64))


def worker(rank: int, world: int) -> dict:
    return {"local": local_loss(rank), "failures": failures(rank)}


@pytest.fixture(scope="module")
def two_ranks() -> list[dict]:
    return spawn(worker, WORLD, timeout=240)


class Interrupts(torch.nn.Module):
    """A tower that raises ``error`` at its ``at``-th call with gradients (pass 2) once armed."""

    def __init__(self):
        super().__init__()
        self.tower = Tower().double()
        self.error: BaseException | None = None
        self.at = self.calls = 0

    def arm(self, error: BaseException, at: int) -> None:
        self.error, self.at, self.calls = error, at, 0

    def forward(self, x):
        if self.error is not None and torch.is_grad_enabled():
            self.calls += 1
            if self.calls == self.at:
                error, self.error = self.error, None
                raise error
        return self.tower(x)


def bucket_views(group=None) -> DistributedDataParallel:
    """A DDP tower whose ``.grad`` are views of DDP's flat buckets, all 7."""
    torch.manual_seed(0)
    model = DistributedDataParallel(Interrupts(), gradient_as_bucket_view=True,
                                    process_group=group)
    model(torch.zeros(1, 6, dtype=torch.float64)).sum().backward()   # DDP makes the views
    for parameter in model.parameters():
        parameter.grad.fill_(7.0)
    return model


def snapshot(tensors) -> list:
    return [(t, t.grad, None if t.grad is None else t.grad.clone()) for t in tensors]


def untouched(saved: list, *, same_objects: bool = True) -> bool:
    """Every ``.grad`` holds its value from the snapshot (and is the very object, by default)."""
    for tensor, grad, value in saved:
        if value is None:
            if tensor.grad is not None:
                return False
        elif (same_objects and tensor.grad is not grad) or not torch.equal(tensor.grad, value):
            return False
    return True


def outcome(call) -> str:
    try:
        call()
    except BaseException as error:   # KeyboardInterrupt included: the test is about it
        return f"{type(error).__name__}: {error}"
    return "ok"


class Patched:
    """``torch.distributed.all_reduce`` replaced inside the block (the gradient average's)."""

    def __init__(self, replacement):
        self.replacement, self.original, self.calls = replacement, dist.all_reduce, 0

    def __enter__(self):
        def patched(*args, **kwargs):
            self.calls += 1
            return self.replacement(self.original, self.calls, *args, **kwargs)
        dist.all_reduce = patched
        return self

    def __exit__(self, *exc):
        dist.all_reduce = self.original


def transport_breaks_in_second_bucket(original, call, *args, **kwargs):
    """Rank 0's view of a peer dying mid-average: the second bucket's all-reduce goes through
    (so that rank 1 completes), then reports the failure."""
    result = original(*args, **kwargs)
    if call == 2:
        raise RuntimeError("Connection closed by peer (simulated)")
    return result


def interrupted_before_sending(original, call, *args, **kwargs):
    raise KeyboardInterrupt("dies after the last agreement")


def local_loss(rank: int) -> dict:
    torch.manual_seed(0)
    model = DistributedDataParallel(Tower().double())
    calls = []

    def counting_hook(state, bucket):
        calls.append(1)
        return allreduce_hook(state, bucket)

    model.register_comm_hook(None, counting_hook)
    cached_step(model, local_batch(rank), info_nce, chunk_size=3)
    out = {"grads": [p.grad for p in model.parameters()], "calls": len(calls)}

    # no comm hook: DDP's hooks bypassed, one agreement, then the step's own average, added into
    # the very .grad objects (views of DDP's flat buckets)
    viewed = bucket_views()
    held = [p.grad for p in viewed.parameters()]
    out["one_bucket"] = len({g.untyped_storage().data_ptr() for g in held}) == 1
    with counting(dist, "all_reduce") as reduces:
        cached_step(viewed, local_batch(rank), info_nce, chunk_size=3)
    out["viewed"] = [p.grad - 7 for p in viewed.parameters()]
    out["viewed_same_objects"] = all(p.grad is g for p, g in zip(viewed.parameters(), held))
    out["viewed_reduces"] = len(reduces)

    # under no_sync nothing is averaged (gradient accumulation), as with DDP
    torch.manual_seed(0)
    accumulating = DistributedDataParallel(Tower().double())
    with counting(dist, "all_reduce") as reduces, accumulating.no_sync():
        cached_step(accumulating, local_batch(rank), info_nce, chunk_size=3)
    out["no_sync"] = [p.grad.clone() for p in accumulating.parameters()]
    out["no_sync_reduces"] = len(reduces)
    return out


def failures(rank: int) -> dict:
    out: dict = {}
    q, p = rank_batch(rank)
    chunk = 2 + rank
    pass_two_last = -(-len(q) // chunk) + -(-len(p) // chunk)   # pass 2's last chunk

    # 1. the final average fails after the last agreement (several buckets; the second fails on
    # rank 0 after it went through, so rank 1 succeeds): rank 0 raises with every .grad as it
    # was, the loss-owned temperature's too; rank 1 accumulates into DDP's bucket views
    for entry in ("step", "loss"):
        model = bucket_views()
        temperature = torch.nn.Parameter(torch.tensor(0.2, dtype=torch.float64))
        temperature.grad = torch.tensor(7.0, dtype=torch.float64)
        saved = snapshot(list(model.parameters()))
        saved_temperature = snapshot([temperature])

        def run(entry=entry, model=model, temperature=temperature):
            if entry == "step":
                cached_step(model, (q, p), lambda a, b: info_nce(a, b, temperature),
                            chunk_size=chunk, distributed=True)
            else:
                cached_loss(model, (q, p), lambda a, b: info_nce(a, b, temperature),
                            chunk_size=chunk, distributed=True).backward()

        GradientSync.BUCKET_BYTES, bucket = 8 * 100, GradientSync.BUCKET_BYTES   # two buckets
        try:
            with Patched(transport_breaks_in_second_bucket if rank == 0
                         else lambda original, call, *a, **k: original(*a, **k)) as patch:
                out[f"sync_{entry}"] = outcome(run)
        finally:
            GradientSync.BUCKET_BYTES = bucket
        out[f"sync_{entry}_buckets"] = patch.calls
        out[f"sync_{entry}_same_objects"] = all(t.grad is g for t, g, _ in saved)
        out[f"sync_{entry}_kept"] = untouched(saved) and untouched(saved_temperature,
                                                                   same_objects=False)
        out[f"sync_{entry}_grads"] = [t.grad.clone() for t in model.parameters()]
        out[f"sync_{entry}_temperature"] = temperature.grad.clone()

    # 2. a rank absent from the final average (alive, interrupted before sending): the other
    # raises at its group's timeout; both with every .grad as it was
    quick = dist.new_group(backend="gloo", timeout=timedelta(seconds=3))
    torch.manual_seed(0)
    plain = Tower().double()
    for parameter in plain.parameters():
        parameter.grad = torch.full_like(parameter, 7.0)
    saved = snapshot(list(plain.parameters()))
    with Patched(interrupted_before_sending if rank == 1
                 else lambda original, call, *a, **k: original(*a, **k)):
        out["absent"] = outcome(lambda: cached_step(plain, (q, p), info_nce, chunk_size=chunk,
                                                    distributed=quick))
    out["absent_kept"] = untouched(saved)

    # 3. KeyboardInterrupt in rank 1's last pass-2 chunk, and the loop goes on: every rank stops
    # at the agreement with every .grad as it was, and the next step meets as one
    model = bucket_views()
    saved = snapshot(list(model.parameters()))
    if rank == 1:
        model.module.arm(KeyboardInterrupt(), pass_two_last)
    out["interrupt"] = outcome(lambda: cached_step(model, (q, p), info_nce, chunk_size=chunk,
                                                   distributed=True))
    out["interrupt_kept"] = untouched(saved)
    out["interrupt_next"] = float(cached_step(model, (q, p), info_nce, chunk_size=chunk,
                                              distributed=True))
    # the same inside cached_loss's backward
    saved = snapshot(list(model.parameters()))
    if rank == 1:
        model.module.arm(KeyboardInterrupt(), pass_two_last)
    loss = cached_loss(model, (q, p), info_nce, chunk_size=chunk, distributed=True)
    out["interrupt_loss"] = outcome(loss.backward)
    out["interrupt_loss_kept"] = untouched(saved)

    # 4. out of step: rank 1 began a step and left it without an agreement (its counter moved);
    # both raise, naming both steps, nothing applied, and the next step meets again
    out["steps_before"] = TorchCollective().step_counter().value
    if rank == 1:
        Rendezvous(TorchCollective(), planned=2)
    saved = snapshot(list(model.parameters()))
    out["out_of_step"] = outcome(lambda: cached_step(model, (q, p), info_nce, chunk_size=chunk,
                                                     distributed=True))
    out["out_of_step_kept"] = untouched(saved)
    out["out_of_step_next"] = float(cached_step(model, (q, p), info_nce, chunk_size=chunk,
                                                distributed=True))

    # 5. DDP without distributed=, rank 1 raising in its last pass-2 chunk: DDP's own all-reduce
    # would keep rank 0 waiting until the group's timeout (5 s here, 30 minutes by default); the
    # agreement stops both at once, cached_step and cached_loss alike
    slow = dist.new_group(backend="gloo", timeout=timedelta(seconds=5))
    local = bucket_views(slow)
    for entry in ("step", "loss"):
        saved = snapshot(list(local.parameters()))
        if rank == 1:
            local.module.arm(RuntimeError("pass 2 broke"), pass_two_last)
        if entry == "step":
            call = lambda: cached_step(local, (q, p), info_nce, chunk_size=chunk)  # noqa: E731
        else:
            call = lambda: cached_loss(local, (q, p), info_nce,  # noqa: E731
                                       chunk_size=chunk).backward()
        out[f"ddp_{entry}"] = outcome(call)
        out[f"ddp_{entry}_kept"] = untouched(saved)
    return out


def test_ddp_gradients_equal_the_averaged_full_batch_gradients(two_ranks) -> None:
    results = [out["local"] for out in two_ranks]
    torch.manual_seed(0)
    reference = Tower().double()
    for rank in range(WORLD):
        q, p = local_batch(rank)
        (info_nce(reference(q), reference(p)) / WORLD).backward()  # DDP averages over ranks
    for rank, result in enumerate(results):
        assert result["calls"] == 1, "expected one all-reduce (one bucket) per step"
        for got, want in zip(result["grads"], reference.parameters()):
            torch.testing.assert_close(got, want.grad, rtol=1e-10, atol=1e-12)
        assert result["viewed_reduces"] == 1, "expected one all-reduce (one bucket) per step"
        assert result["one_bucket"], "the .grad must be views of DDP's one flat bucket"
        assert result["viewed_same_objects"]
        for got, want in zip(result["viewed"], reference.parameters(), strict=True):
            torch.testing.assert_close(got, want.grad, rtol=1e-10, atol=1e-12)
        assert result["no_sync_reduces"] == 0
        torch.manual_seed(0)
        alone = Tower().double()
        q, p = local_batch(rank)
        info_nce(alone(q), alone(p)).backward()
        for got, want in zip(result["no_sync"], alone.parameters(), strict=True):
            torch.testing.assert_close(got, want.grad, rtol=1e-10, atol=1e-12)


def test_failures_end_at_once_with_every_gradient_as_it_was(two_ranks) -> None:
    results = [out["failures"] for out in two_ranks]
    _, (tower_grads,), temperature_grad = global_reference(WORLD)
    for rank, out in enumerate(results):
        for entry in ("step", "loss"):
            assert out[f"sync_{entry}_buckets"] == 2, out[f"sync_{entry}_buckets"]
            assert out[f"sync_{entry}_same_objects"], entry
            if rank == 0:
                assert out[f"sync_{entry}"] == "RuntimeError: Connection closed by peer " \
                    "(simulated)", out[f"sync_{entry}"]
                assert out[f"sync_{entry}_kept"], entry
            else:   # this rank's average went through: accumulated into the same objects
                assert out[f"sync_{entry}"] == "ok", out[f"sync_{entry}"]
                for got, want in zip(out[f"sync_{entry}_grads"], tower_grads, strict=True):
                    torch.testing.assert_close(got, want + 7, rtol=1e-10, atol=1e-12)
                torch.testing.assert_close(out[f"sync_{entry}_temperature"],
                                           temperature_grad + 7, rtol=1e-10, atol=1e-12)

        if rank == 0:
            assert "timed out" in out["absent"].lower() or "timeout" in out["absent"].lower(), \
                out["absent"]
        else:
            assert out["absent"] == "KeyboardInterrupt: dies after the last agreement"
        assert out["absent_kept"]

        for entry in ("interrupt", "interrupt_loss"):
            if rank == 1:
                assert out[entry] == "KeyboardInterrupt: ", out[entry]
            else:
                assert "GradCacheError: rank 1 failed (KeyboardInterrupt); every rank stopped " \
                    "(after pass 2) and no gradient was applied" in out[entry], out[entry]
            assert out[f"{entry}_kept"], entry
        assert out["interrupt_next"] == results[0]["interrupt_next"]

        before = out["steps_before"]   # rank 1 skipped one
        mine, theirs = (before + 1, before + 2) if rank == 0 else (before + 2, before + 1)
        assert f"GradCacheError: the ranks are out of step: rank {1 - rank} is at step {theirs} " \
            f"(after pass 1); this rank ({rank}) is at step {mine} (after pass 1)" \
            in out["out_of_step"], out["out_of_step"]
        assert out["out_of_step_kept"]
        assert out["out_of_step_next"] == results[0]["out_of_step_next"]

        for entry in ("step", "loss"):
            if rank == 1:
                assert out[f"ddp_{entry}"] == "RuntimeError: pass 2 broke", out[f"ddp_{entry}"]
            else:
                assert "rank 1 failed (RuntimeError: pass 2 broke); every rank stopped " \
                    "(after pass 2)" in out[f"ddp_{entry}"], out[f"ddp_{entry}"]
            # (rank 0's message shows that the agreement ended it, not the group's timeout)
            assert out[f"ddp_{entry}_kept"], entry

