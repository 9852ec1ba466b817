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

import contextlib
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
from tests.torch.test_hostile import Bag

pytestmark = pytest.mark.slow

WORLD = 2


def local_batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + rank)
    return (torch.randn(10, 6, generator=generator, dtype=torch.float64),
            torch.randn(10, 6, generator=generator, dtype=torch.float64))


def worker(rank: int, world: int) -> dict:
    return {"local": local_loss(rank), "failures": failures(rank), "hostile": hostile(rank)}


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


def interrupted_mid_exchange(original, call, *args, **kwargs):
    """A real Ctrl-C (SIGINT) on this rank after the first of all_gather_object's two
    collectives: where a rank waiting at an agreement for the slower one receives it."""
    import os
    import signal
    result = original(*args, **kwargs)
    if call == 1:
        os.kill(os.getpid(), signal.SIGINT)
    return result


class PatchedGather(Patched):
    """``all_gather`` as ``all_gather_object`` calls it (a global of ``distributed_c10d``)."""

    def __enter__(self):
        import torch.distributed.distributed_c10d as c10d
        self.module, self.original = c10d, c10d.all_gather

        def patched(*args, **kwargs):
            self.calls += 1
            return self.replacement(self.original, self.calls, *args, **kwargs)
        c10d.all_gather = patched
        return self

    def __exit__(self, *exc):
        self.module.all_gather = self.original


def bag_ids(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(200 + rank)
    return (torch.randint(0, 20, (4, 3), generator=generator),
            torch.randint(0, 20, (4, 3), generator=generator))


def hostile(rank: int) -> dict:
    """What the adversarial pass found on two ranks: a rank refusing a step before it began (a
    bad option, gradients off) left the others waiting at their first agreement until the
    timeout; a Ctrl-C between the two collectives of an agreement's exchange aborted the process
    (gloo) and fed the other garbage; sparse gradients broke the step's own average, which also
    averaged the parameters DDP ignores (and broadcast its ignored buffers)."""
    out: dict = {}
    q, p = rank_batch(rank)
    quick = dist.new_group(backend="gloo", timeout=timedelta(seconds=5))
    def refused_on_rank_1(case: str, model: DistributedDataParallel) -> None:
        if case == "option":
            bad = {"loss_kwargs": 5} if rank == 1 else {}
            cached_step(model, (q, p), info_nce, chunk_size=3, distributed=quick, **bad)
            return
        with torch.no_grad() if rank == 1 else contextlib.nullcontext():
            cached_step(model, (q, p), info_nce, chunk_size=3)

    for case in ("option", "no_grad"):
        model = bucket_views(quick)
        saved = snapshot(list(model.parameters()))
        out[case] = outcome(lambda case=case, model=model: refused_on_rank_1(case, model))
        out[f"{case}_kept"] = untouched(saved)

    import signal
    # a process started from a pytest-xdist worker inherits its ignored SIGINT: a terminal's
    # Ctrl-C reaches a training script with Python's own handler, so this scenario installs it
    signal.signal(signal.SIGINT, signal.default_int_handler)
    model = bucket_views()
    saved = snapshot(list(model.parameters()))
    with PatchedGather(interrupted_mid_exchange if rank == 1
                       else lambda original, call, *a, **k: original(*a, **k)):
        out["ctrl_c"] = outcome(lambda: cached_step(model, (q, p), info_nce, chunk_size=3,
                                                    distributed=True))
    out["ctrl_c_kept"] = untouched(saved)
    out["ctrl_c_next"] = float(cached_step(model, (q, p), info_nce, chunk_size=3,
                                           distributed=True))

    bag = Bag()
    cached_step(DistributedDataParallel(bag), bag_ids(rank), info_nce, chunk_size=2)
    out["sparse"] = bag.embedding.weight.grad

    # what DDP ignores (_ddp_params_and_buffers_to_ignore) is neither averaged nor broadcast
    torch.manual_seed(0)
    tower = Tower().double()
    tower.register_buffer("seen", torch.full((1,), float(rank)))
    tower._ddp_params_and_buffers_to_ignore = ["b.weight", "b.bias", "seen"]
    model = DistributedDataParallel(tower)
    cached_step(model, (q, p), info_nce, chunk_size=3)
    cached = [param.grad.clone() for param in tower.parameters()]
    out["ignored_buffer"] = float(tower.seen)
    tower.zero_grad(set_to_none=True)
    info_nce(model(q), model(p)).backward()
    out["ignored_as_ddp"] = [torch.allclose(got, param.grad, rtol=1e-10, atol=1e-12)
                             for got, param in zip(cached, tower.parameters())]
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



def test_hostile_calls_end_at_once_with_every_gradient_as_it_was(two_ranks) -> None:
    results = [out["hostile"] for out in two_ranks]
    for rank, out in enumerate(results):
        for case, cause in (("option", "GradCacheError: loss_kwargs must be a mapping"),
                            ("no_grad", "GradCacheError: cached_step ran under torch.no_grad()")):
            if rank == 1:
                assert out[case].startswith(cause), out[case]
            else:   # told at its first agreement, not by the group's 5 s timeout
                assert f"rank 1 failed ({cause}" in out[case], out[case]
            assert out[f"{case}_kept"], case
        if rank == 1:
            assert out["ctrl_c"] == "KeyboardInterrupt: ", out["ctrl_c"]
        else:   # rank 1 held it through the step's collectives and reported it at the next meeting
            assert "rank 1 failed (KeyboardInterrupt); every rank stopped (after pass 2)" \
                in out["ctrl_c"], out["ctrl_c"]
        assert out["ctrl_c_kept"]
        assert out["ctrl_c_next"] == results[0]["ctrl_c_next"]

    for rank, out in enumerate(results):
        assert out["ignored_as_ddp"] == [True] * 4, out["ignored_as_ddp"]
        assert out["ignored_buffer"] == rank

    bag = Bag()
    for rank in range(WORLD):   # DDP's average of each rank's local loss
        q, p = bag_ids(rank)
        (info_nce(bag(q), bag(p)) / WORLD).backward()
    for out in results:
        assert out["sparse"].is_sparse
        torch.testing.assert_close(out["sparse"].to_dense(), bag.embedding.weight.grad.to_dense(),
                                   rtol=1e-10, atol=1e-12)
