"""Distributed cached steps on gloo (127.0.0.1): gradients equal one process running the global batch.

Each rank holds its own rows (unequal counts, unequal chunk counts); after
``cached_step(..., distributed=True)`` every rank must hold the global loss and the gradients of a
single process that ran the whole global batch, for DDP, FSDP2 and unwrapped modules, with one
gradient reduction per module per step; a failing rank must stop every rank with nothing applied.
"""

from __future__ import annotations

import contextlib
import copy
import os
import random
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from gradcache import GradCacheError
from gradcache_cli.spawn import spawn
from gradcache_torch import all_gather_rows, cached_step
from tests.torch.test_features import Tower, info_nce

pytestmark = pytest.mark.slow


def rows_of(rank: int) -> int:
    return 5 + 3 * rank        # unequal local batches


def local_batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + rank)
    n = rows_of(rank)
    return (torch.randn(n, 6, generator=generator, dtype=torch.float64),
            torch.randn(2 * n, 6, generator=generator, dtype=torch.float64))   # one hard negative


def global_reference(world: int, *, two_towers: bool = False):
    """Loss, tower gradients and temperature gradient of one process running every rank's rows."""
    torch.manual_seed(0)
    towers = [Tower().double(), Tower().double()] if two_towers else [Tower().double()]
    temperature = torch.nn.Parameter(torch.tensor(0.2, dtype=torch.float64))
    batches = [local_batch(rank) for rank in range(world)]
    q = torch.cat([b[0] for b in batches])
    p = torch.cat([b[1] for b in batches])
    loss = info_nce(towers[0](q), towers[-1](p), temperature)
    loss.backward()
    return loss.detach(), [[t.grad.clone() for t in tower.parameters()] for tower in towers], temperature.grad


class TwoTowers(torch.nn.Module):
    """Both towers and the temperature in one module, the usual CLIP layout."""

    def __init__(self):
        super().__init__()
        self.query, self.passage = Tower().double(), Tower().double()
        self.temperature = torch.nn.Parameter(torch.tensor(0.2, dtype=torch.float64))

    def forward(self, x: torch.Tensor, side: str) -> torch.Tensor:
        return self.query(x) if side == "query" else self.passage(x)


@contextlib.contextmanager
def counting(module, name: str):
    """Counts calls of ``module.name`` (looked up at call time) inside the block."""
    original, calls = getattr(module, name), []

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    setattr(module, name, counted)
    try:
        yield calls
    finally:
        setattr(module, name, original)


def full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def scenarios(rank: int, world: int) -> dict:
    """Runs every scenario on this rank; returns what the test compares."""
    out: dict = {}
    q, p = local_batch(rank)
    chunk = 2 + rank               # unequal chunk sizes: unequal numbers of chunks

    # DDP, counting all-reduces, and a learnable temperature outside the model
    torch.manual_seed(0)
    model = DistributedDataParallel(Tower().double())
    temperature = torch.nn.Parameter(torch.tensor(0.2, dtype=torch.float64))
    with counting(dist, "all_reduce") as calls:
        loss = cached_step(model, (q, p), lambda a, b: info_nce(a, b, temperature),
                           chunk_size=chunk, distributed=True)
    out["ddp"] = (loss, [t.grad.clone() for t in model.parameters()], temperature.grad.clone(),
                  len(calls))

    # one DDP module holding both towers and the temperature: the last chunk uses one tower only,
    # and the temperature none (DDP's own sync would leave those unreduced)
    torch.manual_seed(0)
    both = TwoTowers()
    model = DistributedDataParallel(both)
    cached_step(model, ({"x": q, "side": "query"}, {"x": p, "side": "passage"}),
                lambda a, b: info_nce(a, b, both.temperature), chunk_size=chunk, distributed=True)
    out["one_module"] = [t.grad.clone() for t in both.parameters()]

    # two separately wrapped towers: one all-reduce each
    torch.manual_seed(0)
    towers = [DistributedDataParallel(Tower().double()), DistributedDataParallel(Tower().double())]
    temperature = torch.nn.Parameter(torch.tensor(0.2, dtype=torch.float64))
    cached_step(towers, (q, p), lambda a, b: info_nce(a, b, temperature), chunk_size=[chunk, 3],
                distributed=True)
    out["two_towers"] = [[t.grad.clone() for t in tower.parameters()] for tower in towers]

    # an unwrapped module: averaged by the adapter's own all-reduce; gradients accumulate, and a
    # parameter no rank uses keeps no gradient
    torch.manual_seed(0)
    plain = Tower().double()
    for parameter in plain.parameters():
        parameter.grad = torch.ones_like(parameter)
    plain.unused = torch.nn.Linear(2, 2)
    cached_step(plain, (q, p), lambda a, b: info_nce(a, b, 0.2), chunk_size=chunk, distributed=True)
    out["plain"] = [t.grad.clone() for t in (plain.a.weight, plain.a.bias, plain.b.weight, plain.b.bias)]
    out["unused"] = plain.unused.weight.grad

    # representations carrying a non-tensor leaf that differs between ranks (a tag) still fit
    torch.manual_seed(0)
    tagged = Tower().double()
    cached_step(tagged, (q, p), lambda a, b: info_nce(a["rep"], b["rep"], 0.2), chunk_size=chunk,
                get_rep=lambda out: {"rep": out, "from": f"rank {rank}"}, distributed=True)
    out["tagged"] = [t.grad.clone() for t in tagged.parameters()]

    # the options the guide lists as supported: a GradScaler, check_determinism, check_finite
    torch.manual_seed(0)
    scaled = Tower().double()
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    cached_step(scaled, (q, p), lambda a, b: info_nce(a, b, 0.2), chunk_size=chunk, scaler=scaler,
                check_determinism=True, check_finite=True, distributed=True)
    out["scaled"] = [t.grad / 8 for t in scaled.parameters()]

    # DDP's buffers come from rank 0 at the start of the step (broadcast_buffers)
    torch.manual_seed(0)
    buffered = Tower().double()
    buffered.register_buffer("seen", torch.full((3,), float(rank)))
    ddp_buffered = DistributedDataParallel(buffered)
    buffered.seen.fill_(float(rank))   # DDP's constructor synchronised it; make it differ again
    cached_step(ddp_buffered, (q, p), info_nce, chunk_size=chunk, distributed=True)
    out["buffer"] = buffered.seen.tolist()

    # per-row loss arguments gathered in rank order, unequal rows included
    out["gathered_rows"] = all_gather_rows(torch.full((rows_of(rank), 2), float(rank))).tolist()

    # the last rank fails in its very last pass-2 chunk: every rank raises, every .grad restored
    class FailsLate(torch.nn.Module):
        def __init__(self, tower, fail):
            super().__init__()
            self.tower, self.fail, self.calls = tower, fail, 0

        def forward(self, x):
            self.calls += 1
            if self.fail and torch.is_grad_enabled() and self.calls == self.fail:
                raise RuntimeError("late failure")
            return self.tower(x)

    torch.manual_seed(0)
    ddp = DistributedDataParallel(Tower().double())
    chunks = -(-len(q) // chunk) + -(-len(p) // chunk)
    late = FailsLate(ddp.module, 2 * chunks if rank == world - 1 else 0)
    for parameter in ddp.parameters():
        parameter.grad = torch.full_like(parameter, 7.0)
    try:
        cached_step([late, late], (q, p), info_nce, chunk_size=chunk, distributed=True)
        out["late"] = "no error"
    except Exception as error:
        out["late"] = f"{type(error).__name__}: {error}"
    out["late_grads_kept"] = all(bool((t.grad == 7).all()) for t in ddp.parameters())

    # FSDP2
    from torch.distributed.fsdp import fully_shard
    torch.manual_seed(0)
    sharded = Tower().double()
    fully_shard(sharded.a)
    fully_shard(sharded)
    # FSDP2 gathers parameters in every forward: every rank runs 3 chunks per group
    rows = rows_of(rank)
    with counting(dist, "reduce_scatter_single") as scatters:   # FSDP2's gradient reductions
        cached_step(sharded, (q, p), lambda a, b: info_nce(a, b, 0.2),
                    chunk_size=[-(-rows // 3), -(-2 * rows // 3)], distributed=True)
    out["fsdp_scatters"] = len(scatters)
    out["fsdp"] = [full(t.grad).clone() for t in sharded.parameters()]
    out["fsdp_sync_restored"] = sharded._get_fsdp_state()._fsdp_param_group.reduce_grads
    try:
        cached_step(sharded, (q, p), info_nce, chunk_size=chunk, distributed=True)
        out["fsdp_counts"] = "no error"
    except GradCacheError as error:
        out["fsdp_counts"] = str(error)

    # a rank that fails in pass 1 stops every rank, with no gradient anywhere
    torch.manual_seed(0)
    model = DistributedDataParallel(Tower().double())

    class Broken(torch.nn.Module):
        def forward(self, x):
            raise MemoryError("out of memory on purpose")

    encoder = model if rank != world - 1 else Broken()
    try:
        cached_step(encoder, (q, p), info_nce, chunk_size=chunk, distributed=True)
        out["failure"] = "no error"
    except GradCacheError as error:
        out["failure"] = str(error)
    except MemoryError as error:
        out["failure"] = f"own: {error}"
    out["failure_grads"] = [t.grad for t in model.parameters()]
    return out


def check_against_reference(results: list[dict], world: int) -> None:
    loss, (tower_grads,), temperature_grad = global_reference(world)
    for rank, out in enumerate(results):
        got_loss, got_grads, got_temperature, calls = out["ddp"]
        torch.testing.assert_close(got_loss, loss, rtol=1e-12, atol=0)
        for got, want in zip(got_grads, tower_grads):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got_temperature, temperature_grad, rtol=1e-10, atol=1e-12)
        assert calls == 1, "DDP's gradients must be all-reduced once per step (one bucket here)"
        for got, want in zip(out["fsdp"], tower_grads):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        assert out["fsdp_sync_restored"], "FSDP2 gradient sync must be switched back on"
        # one reduce-scatter per FSDP2 unit (the inner layer and the root) per step
        assert out["fsdp_scatters"] == 2, out["fsdp_scatters"]
        assert "every rank must run the same number of chunks" in out["fsdp_counts"]
        for got, want in zip(out["plain"], tower_grads):
            torch.testing.assert_close(got, want + 1, rtol=1e-10, atol=1e-12)
        assert out["unused"] is None
        for got, want in zip(out["scaled"], tower_grads, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        assert out["buffer"] == [0.0, 0.0, 0.0]
        assert out["gathered_rows"] == [[float(r)] * 2 for r in range(world) for _ in range(rows_of(r))]
        for got, want in zip(out["tagged"], tower_grads, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        if rank == world - 1:
            assert out["late"] == "RuntimeError: late failure", out["late"]
        else:
            assert "failed (RuntimeError: late failure); every rank stopped (after pass 2)" \
                in out["late"], out["late"]
        assert out["late_grads_kept"]
        if rank == world - 1:
            assert out["failure"] == "own: out of memory on purpose"
        else:
            assert f"rank {world - 1} failed (MemoryError: out of memory on purpose); every rank " \
                "stopped (after pass 1)" in out["failure"], out["failure"]
        assert all(g is None for g in out["failure_grads"])
    _, towers, temperature_grad = global_reference(world, two_towers=True)
    for out in results:
        for got_tower, want_tower in zip(out["two_towers"], towers):
            for got, want in zip(got_tower, want_tower):
                torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        want = [temperature_grad] + towers[0] + towers[1]   # own parameters first
        for got, expected in zip(out["one_module"], want, strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("world", [2, 4])
def test_every_rank_gets_the_global_batch_gradients(world) -> None:
    check_against_reference(spawn(scenarios, world, timeout=240), world)


def absent_rank(rank: int, world: int) -> str:
    """Rank 1 never takes the step: rank 0 must stop at the group's timeout, not wait forever."""
    quick = dist.new_group(backend="gloo", timeout=timedelta(seconds=3))
    if rank == 1:
        time.sleep(10)   # alive but absent: rank 0's collective can only end by its timeout
        return "skipped"
    q, p = local_batch(rank)
    try:
        cached_step(Tower().double(), (q, p), info_nce, chunk_size=2, distributed=quick)
    except Exception as error:  # gloo's timeout error
        return f"{type(error).__name__}: {error}"
    return "no error"


def test_a_rank_that_never_comes_times_out_instead_of_hanging() -> None:
    first, second = spawn(absent_rank, 2, timeout=60)
    assert second == "skipped"
    assert "timed out" in first.lower() or "timeout" in first.lower(), first


def test_distributed_needs_an_initialised_process_group() -> None:
    with pytest.raises(GradCacheError, match="init_process_group"):
        cached_step(Tower().double(), (torch.randn(4, 6, dtype=torch.float64),) * 2, info_nce,
                    chunk_size=2, distributed=True)


def test_the_torchrun_example_runs_and_is_exact() -> None:
    import subprocess
    import sys
    from pathlib import Path

    from gradcache_cli.spawn import free_port

    script = Path(__file__).resolve().parents[2] / "docs" / "examples" / "torchrun_step.py"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
         "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(script), "--check"],
        capture_output=True, text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "largest relative gradient difference from one process" in result.stdout


def random_case(seed: int, rank: int, world: int) -> dict:
    """A seeded random configuration: rows per rank, chunk sizes, 1-3 groups, shared or separate
    encoders, wrapped in DDP or not; the same description on every rank."""
    rng = random.Random(seed)
    groups = rng.randint(1, 3)
    return {
        "rows": [rng.randint(1, 6) for _ in range(world)],
        "chunks": [rng.randint(1, 4) for _ in range(groups)],
        "shared": rng.random() < 0.5,
        "ddp": rng.random() < 0.5,
        "groups": groups,
    }


def case_inputs(seed: int, rank: int, case: dict) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 * seed + rank)
    return [torch.randn(case["rows"][rank], 6, generator=generator, dtype=torch.float64)
            for _ in range(case["groups"])]


def everything_loss(*reps: torch.Tensor) -> torch.Tensor:
    """InfoNCE of the first group against the rows of every group: couples every row."""
    columns = torch.cat(reps)
    return F.cross_entropy(reps[0] @ columns.T / 0.3, torch.arange(len(reps[0])))


def random_cases(rank: int, world: int) -> list[float]:
    """Worst relative error against one process on the global batch, per random case."""
    errors = []
    for seed in range(6):
        case = random_case(seed, rank, world)
        torch.manual_seed(seed)
        towers = [Tower().double() for _ in range(1 if case["shared"] else case["groups"])]
        reference = [copy.deepcopy(t) for t in towers]
        wrapped = [DistributedDataParallel(t) if case["ddp"] else t for t in towers]
        encoders = wrapped[0] if case["shared"] else wrapped
        cached_step(encoders, case_inputs(seed, rank, case), everything_loss,
                    chunk_size=case["chunks"], distributed=True)
        every_rank = [case_inputs(seed, r, case) for r in range(world)]
        global_inputs = [torch.cat([inputs[g] for inputs in every_rank]) for g in range(case["groups"])]
        reps = [reference[0 if case["shared"] else g](x) for g, x in enumerate(global_inputs)]
        everything_loss(*reps).backward()
        worst = 0.0
        for got, want in zip(towers, reference):
            for a, b in zip(got.parameters(), want.parameters()):
                worst = max(worst, float((a.grad - b.grad).abs().max() / b.grad.abs().max()))
        errors.append(worst)
    return errors


@pytest.mark.parametrize("world", [2, 3])
def test_random_configurations_match_one_process(world) -> None:
    for rank, errors in enumerate(spawn(random_cases, world, timeout=240)):
        assert max(errors) <= 1e-10, (rank, errors)
