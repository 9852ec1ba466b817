"""The tiled losses across ranks: each rank sweeps its own rows against every gathered column and
gets the global batch's loss and gradients, equal to one process holding every rank's rows.

The core (:func:`gradcache._loss_forms.forward_across` / ``backward_across``) is checked on numpy
with thread ranks, drawn over ranks, uneven rows, tiles, hard negatives, the three kinds and both
ways to loop; the torch front-end (:func:`gradcache_torch.losses.across_ranks`) with gloo on
127.0.0.1, 2 and 4 processes, alone and as the loss of a distributed ``cached_step``.
"""

from __future__ import annotations

import traceback

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradcache import Collective, GradCacheError, _loss_forms, _tiled
from gradcache.testing import examples, run_ranks
from tests.losses.common import assert_same, default_params, relative_error
from tests.losses.test_core import dense_summed_loss

OPS = {"eager": _tiled.NumpyOps(), "compiled": _tiled.CompiledNumpyOps()}


class _NumpyShapes:
    """The one :class:`gradcache._loss_forms.LossOps` method :func:`layout_across` uses."""

    def shape(self, x: np.ndarray) -> tuple:
        return x.shape


class Recording(Collective):
    """A collective that notes what every tensor collective moved (``(name, shape)``)."""

    def __init__(self, inner):
        self.inner = inner
        self.rank, self.world_size, self.agrees = inner.rank, inner.world_size, inner.agrees
        self.log: list[tuple[str, tuple]] = []

    def exchange(self, payload):
        self.log.append(("exchange", ()))
        return self.inner.exchange(payload)

    def all_gather_rows(self, leaf, counts):
        self.log.append(("all_gather", np.shape(leaf)))
        return self.inner.all_gather_rows(leaf, counts)

    def reduce_scatter_rows(self, leaf, counts):
        self.log.append(("reduce_scatter", np.shape(leaf)))
        return self.inner.reduce_scatter_rows(leaf, counts)

    def all_reduce_sum(self, value):
        self.log.append(("all_reduce", np.shape(value)))
        return self.inner.all_reduce_sum(value)


def split(rows: np.ndarray, counts: list[int]) -> list[np.ndarray]:
    return np.split(rows, np.cumsum(counts)[:-1])


@settings(max_examples=examples(150), deadline=None)
@given(kind=st.sampled_from(_tiled.KINDS), loop=st.sampled_from(sorted(OPS)),
       counts=st.lists(st.integers(1, 6), min_size=1, max_size=4), group=st.integers(1, 3),
       dim=st.integers(1, 4), tile=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_sweeps_across_ranks_equal_the_dense_summed_loss(kind, loop, counts, group, dim, tile,
                                                         seed):
    group = group if kind == _tiled.ROWS else 1
    total = sum(counts)
    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=(total, dim)), rng.normal(size=(total * group, dim))
    alpha, beta = rng.uniform(0.2, 5.0), (rng.uniform(-3, 3) if kind == _tiled.SIGMOID else None)
    grad = rng.uniform(0.5, 2.0)
    ops = OPS[loop]
    xs, ys = split(x, counts), split(y, [c * group for c in counts])

    def rank_fn(rank, collective):
        collective = Recording(collective)
        layout = _loss_forms.layout_across(_NumpyShapes(), collective, xs[rank], ys[rank], "loss",
                                           square=kind != _tiled.ROWS)
        value, columns, row_lse, column_lse = _loss_forms.forward_across(
            ops, collective, layout, kind, xs[rank], ys[rank], alpha, beta, tile)
        grads = _loss_forms.backward_across(ops, collective, layout, kind, xs[rank], columns, alpha,
                                            beta, row_lse, column_lse, grad, tile)
        return (value, *grads), collective.log

    outcomes = run_ranks(len(counts), rank_fn)
    assert all(error is None for _, error in outcomes), outcomes
    results = [result for (result, _), _ in outcomes]
    expected = dense_summed_loss(kind, x, y, alpha, beta)
    floor = max(abs(expected[0]), 1.0)
    for value, _, _, dalpha, dbeta in results:   # the shared results: identical on every rank
        assert value == results[0][0] and dalpha == results[0][3] and dbeta == results[0][4]
    value, _, _, dalpha, dbeta = results[0]
    assert relative_error(value, expected[0], floor=1.0) <= 1e-10
    dx = np.concatenate([r[1] for r in results])
    dy = np.concatenate([r[2] for r in results])
    assert relative_error(dx, grad * expected[1], floor=floor) <= 1e-10
    assert relative_error(dy, grad * expected[2], floor=floor) <= 1e-10
    assert relative_error(dalpha, grad * expected[3], floor=floor) <= 1e-10
    if beta is None:
        assert dbeta is None
    else:
        assert relative_error(dbeta, grad * expected[4], floor=floor) <= 1e-10
    # what moved: one all-gather and one reduce-scatter of the B x d columns, the rest scalars (and
    # CLIP's one B-vector of partial column statistics per rank)
    for rank, ((_, log), _) in enumerate(outcomes):
        want = [("exchange", ()), ("all_gather", ys[rank].shape), ("all_reduce", ())]
        if kind == _tiled.ROWS_AND_COLUMNS:
            want.append(("all_gather", (1, total)))
        want += [("reduce_scatter", y.shape), ("all_reduce", ())]
        if kind == _tiled.SIGMOID:
            want.append(("all_reduce", ()))
        assert log == want


@pytest.mark.parametrize("kind", _tiled.KINDS)
def test_spmd_collectives_exchange_nothing_and_may_trace_the_offset(kind):
    """An SPMD engine's collective (``agrees`` false) is never asked to exchange: every rank holds
    the same rows, and the offset is ``rank * rows`` (a traced integer there; here an np.int64)."""
    rows, group, dim, world = 3, (2 if kind == _tiled.ROWS else 1), 4, 3
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(rows * world, dim)), rng.normal(size=(rows * world * group, dim))
    beta = -1.0 if kind == _tiled.SIGMOID else None
    ops = OPS["compiled"]

    def rank_fn(rank, collective):
        collective = Recording(collective)
        collective.agrees, collective.rank = False, np.int64(rank)
        mine = x[rank * rows:(rank + 1) * rows], y[rank * rows * group:(rank + 1) * rows * group]
        layout = _loss_forms.layout_across(_NumpyShapes(), collective, *mine, "loss",
                                           square=kind != _tiled.ROWS)
        value, columns, row_lse, column_lse = _loss_forms.forward_across(
            ops, collective, layout, kind, *mine, 0.7, beta, 2)
        grads = _loss_forms.backward_across(ops, collective, layout, kind, mine[0], columns, 0.7,
                                            beta, row_lse, column_lse, 1.0, 2)
        return (value, *grads), collective.log

    outcomes = run_ranks(world, rank_fn)
    assert all(error is None for _, error in outcomes), outcomes
    expected = dense_summed_loss(kind, x, y, 0.7, beta)
    for (result, log), _ in outcomes:
        assert "exchange" not in [name for name, _ in log]
        assert relative_error(result[0], expected[0], floor=1.0) <= 1e-10
        assert relative_error(result[3], expected[3], floor=1.0) <= 1e-10
    dy = np.concatenate([result[2] for (result, _), _ in outcomes])
    assert relative_error(dy, expected[2], floor=1.0) <= 1e-10


def test_ranks_that_disagree_all_raise_the_same_error():
    def rank_fn(rank, collective):
        x = np.zeros((2 + rank, 3))
        y = np.zeros(((2 + rank) * (1 + rank), 3))   # rank 0: 1 row per query, rank 1: 2
        return _loss_forms.layout_across(_NumpyShapes(), collective, x, y, "info_nce",
                                         square=False)

    outcomes = run_ranks(2, rank_fn)
    messages = {str(error) for _, error in outcomes}
    assert all(isinstance(error, GradCacheError) for _, error in outcomes)
    assert len(messages) == 1 and "same number of rows per query" in messages.pop()

    def bad_rank(rank, collective):
        x = np.zeros((3, 4))
        y = np.zeros((3 if rank == 0 else 2, 4))
        return _loss_forms.layout_across(_NumpyShapes(), collective, x, y, "clip_loss",
                                         square=True)

    outcomes = run_ranks(3, bad_rank)
    assert all(isinstance(error, GradCacheError) and str(error).startswith("on rank 1: clip_loss")
               for _, error in outcomes), outcomes


# -- torch, gloo on 127.0.0.1 -----------------------------------------------------------------------


def _have_gloo() -> bool:
    try:
        import torch.distributed as dist
    except ImportError:
        return False
    return dist.is_available() and dist.is_gloo_available()


needs_gloo = pytest.mark.skipif(not _have_gloo(), reason="needs torch with gloo")

#: rows per rank of the two runs: uneven, and one rank with a single row
COUNTS = {2: [5, 3], 4: [3, 1, 4, 2]}
HARD_NEGATIVES = 2
DIM = 5


def global_data(loss: str, total: int) -> tuple[np.ndarray, np.ndarray]:
    group = 1 + HARD_NEGATIVES if loss == "info_nce" else 1
    rng = np.random.default_rng({"info_nce": 1, "clip_loss": 2, "siglip_loss": 3}[loss])
    return rng.normal(size=(total, DIM)), rng.normal(size=(total * group, DIM))


def learnable_params(loss: str):
    import torch

    # temperature / scale / bias as tensors that require grad; similarity varies between losses
    return {k: torch.tensor(v, dtype=torch.float64, requires_grad=True)
            for k, v in default_params(loss).items()}


SIMILARITY = {"info_nce": "cosine", "clip_loss": "dot", "siglip_loss": "cosine"}


def _losses_on_rank(rank: int, world: int) -> dict:
    """across_ranks(loss) on this rank's rows: value and gradients, as numpy."""
    import torch

    from gradcache_torch import losses

    counts = COUNTS[world]
    start, count = sum(counts[:rank]), counts[rank]
    out = {}
    for loss in ("info_nce", "clip_loss", "siglip_loss"):
        group = 1 + HARD_NEGATIVES if loss == "info_nce" else 1
        x, y = global_data(loss, sum(counts))
        x = torch.tensor(x[start:start + count], requires_grad=True)
        y = torch.tensor(y[start * group:(start + count) * group], requires_grad=True)
        params = learnable_params(loss)
        fn = losses.across_ranks(getattr(losses, loss), similarity=SIMILARITY[loss], tile_size=2,
                                 **params)
        value = fn(x, y)
        value.backward()
        out[loss] = {"loss": value.detach().numpy(), "x": x.grad.numpy(), "y": y.grad.numpy(),
                     **{k: v.grad.numpy() for k, v in params.items()},
                     "bytes": getattr(fn.collective, "bytes_communicated", None)}
    return out


class Tower:
    """A small float64 encoder, built the same in every process (the module is made lazily so that
    importing this test file needs no torch)."""

    @staticmethod
    def make():
        import torch

        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(),
                                   torch.nn.Linear(8, DIM)).double()


def step_data(total: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    return rng.normal(size=(total, 6)), rng.normal(size=(total * (1 + HARD_NEGATIVES), 6))


STEP_TEMPERATURE = 0.2


def _cached_step_on_rank(rank: int, world: int) -> dict:
    """One distributed cached_step, DDP-wrapped tower, tiled InfoNCE across ranks."""
    import torch
    from torch.nn.parallel import DistributedDataParallel

    from gradcache_torch import cached_step
    from gradcache_torch.losses import across_ranks, info_nce

    counts = COUNTS[world]
    start, count = sum(counts[:rank]), counts[rank]
    q, p = step_data(sum(counts))
    group = 1 + HARD_NEGATIVES
    q = torch.tensor(q[start:start + count])
    p = torch.tensor(p[start * group:(start + count) * group])
    model = DistributedDataParallel(Tower.make())
    temperature = torch.nn.Parameter(torch.tensor(STEP_TEMPERATURE, dtype=torch.float64))
    loss_fn = across_ranks(info_nce, temperature=temperature, tile_size=3)
    value = cached_step(model, (q, p), loss_fn, chunk_size=2, distributed=True)
    return {"loss": value.numpy(), "temperature": temperature.grad.numpy(),
            **{name: param.grad.numpy() for name, param in model.module.named_parameters()}}


def rank_results(rank: int, world: int, with_step: bool) -> dict:
    """What one gloo rank measures (run by ``gradcache_cli.spawn.spawn``)."""
    result: dict = {"losses": _losses_on_rank(rank, world)}
    if with_step:
        try:
            result["step"] = _cached_step_on_rank(rank, world)
        except Exception:   # reported, not raised: the loss results above still count
            result["step_error"] = traceback.format_exc()
    return result


def run_world(world: int, with_step: bool) -> list[dict]:
    from gradcache_cli.spawn import spawn  # imports torch

    return spawn(rank_results, world, with_step, timeout=90)


def dense_reference(loss: str, world: int) -> dict:
    import torch

    from gradcache_torch import losses

    x, y = (torch.tensor(a, requires_grad=True) for a in global_data(loss, sum(COUNTS[world])))
    params = learnable_params(loss)
    value = getattr(losses, f"{loss}_dense")(x, y, similarity=SIMILARITY[loss], **params)
    value.backward()
    return {"loss": value.detach().numpy(), "x": x.grad.numpy(), "y": y.grad.numpy(),
            **{k: v.grad.numpy() for k, v in params.items()}}


def check_losses(results: list[dict], world: int) -> None:
    for loss in ("info_nce", "clip_loss", "siglip_loss"):
        ranks = [result["losses"][loss] for result in results]
        shared = [k for k in ranks[0] if k not in ("x", "y", "bytes")]
        for other in ranks[1:]:   # the loss and the parameters' gradients: identical everywhere
            for key in shared:
                assert np.array_equal(other[key], ranks[0][key]), (loss, key)
        got = {key: ranks[0][key] for key in shared}
        got["x"] = np.concatenate([r["x"] for r in ranks])
        got["y"] = np.concatenate([r["y"] for r in ranks])
        assert_same(got, dense_reference(loss, world), tolerance=1e-10)


@needs_gloo
@pytest.mark.slow
def test_across_ranks_on_two_processes_and_in_a_distributed_cached_step():
    import torch

    from gradcache_torch.losses import info_nce, info_nce_dense

    world = 2
    results = run_world(world, with_step=True)
    check_losses(results, world)
    # what the tensor collectives moved for info_nce (float64): every rank's passages once (the
    # all-gather's output, padded to the largest rank), every passage's gradient once (the
    # reduce-scatter's input, padded likewise), and two scalars (the value and d alpha)
    most = max(COUNTS[world]) * (1 + HARD_NEGATIVES) * DIM * 8
    for result in results:
        if result["losses"]["info_nce"]["bytes"] is not None:
            assert result["losses"]["info_nce"]["bytes"] == 2 * world * most + 2 * 8
    errors = [result.get("step_error") for result in results]
    assert not any(errors), errors[0] or errors[1]
    # the reference: one process, the whole global batch, the tiled loss, a plain backward
    q, p = (torch.tensor(a) for a in step_data(sum(COUNTS[world])))
    model = Tower.make()
    temperature = torch.nn.Parameter(torch.tensor(STEP_TEMPERATURE, dtype=torch.float64))
    value = info_nce(model(q), model(p), temperature=temperature, tile_size=3)
    value.backward()
    dense = info_nce_dense(model(q), model(p), temperature=STEP_TEMPERATURE)
    assert abs(float(value.detach()) - float(dense.detach())) < 1e-12
    want = {"loss": value.detach().numpy(), "temperature": temperature.grad.numpy(),
            **{name: param.grad.numpy() for name, param in model.named_parameters()}}
    for result in results:
        assert_same(result["step"], want, tolerance=1e-10)


@needs_gloo
@pytest.mark.slow
def test_across_ranks_on_four_processes_with_uneven_rows():
    world = 4
    check_losses(run_world(world, with_step=False), world)


def test_across_ranks_takes_only_the_tiled_losses_and_their_arguments():
    losses = pytest.importorskip("gradcache_torch.losses")
    with pytest.raises(GradCacheError, match="takes info_nce, clip_loss or siglip_loss"):
        losses.across_ranks(losses.info_nce_dense)
    with pytest.raises(GradCacheError, match="logit_bias"):
        losses.across_ranks(losses.clip_loss, logit_bias=1.0)
    fn = losses.across_ranks(losses.siglip_loss, logit_bias=-3.0, tile_size=64)
    assert fn.gathers_itself and "siglip_loss" in repr(fn)


@settings(max_examples=examples(40), deadline=None)
@given(kind=st.sampled_from(_tiled.KINDS), counts=st.lists(st.integers(1, 5), min_size=2, max_size=3),
       rank=st.integers(0, 2), tile=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_torch_sweeps_of_one_rank_equal_numpy(kind, counts, rank, tile, seed):
    """One rank's share, in process: torch's tile ops with an offset against the numpy reference."""
    torch = pytest.importorskip("torch")
    losses = pytest.importorskip("gradcache_torch.losses")
    rank = min(rank, len(counts) - 1)
    group = 2 if kind == _tiled.ROWS else 1
    rng = np.random.default_rng(seed)
    x_all, y = rng.normal(size=(sum(counts), 3)), rng.normal(size=(sum(counts) * group, 3))
    offset = sum(counts[:rank])
    x = x_all[offset:offset + counts[rank]]
    beta = -1.5 if kind == _tiled.SIGMOID else None
    column_lse = None if kind != _tiled.ROWS_AND_COLUMNS else rng.normal(size=len(y))
    results = []
    as_torch = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    for ops, wrap in ((_tiled.NumpyOps(), np.asarray), (losses._TILE_OPS, as_torch)):
        args = (wrap(x), wrap(y), wrap(1.3), None if beta is None else wrap(beta))
        value, row_lse, partial = _tiled.tiled_forward(ops, kind, *args, tile, offset=offset,
                                                       group=group, column_term=False)
        stats = wrap(column_lse) if column_lse is not None else None
        grads = _tiled.tiled_backward(ops, kind, *args, row_lse, stats, wrap(0.8), tile,
                                      offset=offset, group=group)
        results.append([np.asarray(v) for v in (value, row_lse, partial, *grads) if v is not None])
    for got, want in zip(results[1], results[0]):
        assert relative_error(got, want, floor=1.0) <= 1e-12
