"""The options every adapter shares behave the same on every backend: one test body, three kits.

``gradcache.StepOptions`` declares the shared options once and the core implements them once, so
one test body per option runs against torch, JAX and TensorFlow through a small kit each: a
mean-pooling text encoder over padded, variable-length rows (float64, so that gradients can be
compared exactly), the InfoNCE loss, and a step that returns the encoder's gradient as numpy.
Padding trim and length sorting must leave the gradients exactly as they were while the encoder sees
narrower chunks; a non-finite loss, an unknown option and a bad value are refused before any
gradient is returned; a progress bar follows an eager step.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from gradcache import GradCacheError
from gradcache.testing import run_ranks

VOCAB, DIM = 11, 5


def padded_batch(seed: int, rows: int = 10, width: int = 9) -> dict[str, np.ndarray]:
    """Rows of 1..width tokens, padded to ``width`` (so most chunks can be trimmed)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, width + 1, size=rows)
    lengths[0] = width // 2   # no chunk of the first rows needs every column
    ids = rng.integers(1, VOCAB, size=(rows, width))
    mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
    return {"input_ids": ids * mask, "attention_mask": mask}


@dataclass
class Kit:
    """One backend's way to run the shared problem: ``step(inputs, **options) -> grad``, through
    ``cached_step`` or (``entry="cached_loss"``) ``cached_loss`` and the framework's autodiff."""

    name: str
    step: Callable[..., np.ndarray]
    widths: list = field(default_factory=list)   # the sequence lengths the encoder saw
    concat: Callable[[list], Any] | None = None   # joins rows of this framework's tensors
    losses: Any = None                            # the adapter's losses module


def torch_kit(weights: np.ndarray) -> Kit:
    import torch

    from gradcache_torch import cached_loss, cached_step, losses

    kit = Kit("torch", None, concat=lambda leaves: torch.cat(leaves, dim=0), losses=losses)

    class Pool(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.table = torch.nn.Parameter(torch.tensor(weights))

        def forward(self, input_ids, attention_mask):
            kit.widths.append(int(input_ids.shape[1]))
            mask = attention_mask.unsqueeze(-1).to(self.table.dtype)
            return torch.tanh((self.table[input_ids] * mask).sum(1) / mask.sum(1))

    def info_nce(q, p, scale: float = 1.0):
        return torch.nn.functional.cross_entropy(scale * q @ p.T, torch.arange(len(q)))

    def step(groups, loss=info_nce, entry="cached_step", **options) -> np.ndarray:
        model = Pool()
        tensors = [{k: torch.tensor(v) for k, v in group.items()} for group in groups]
        if entry == "cached_loss":
            cached_loss(model, tensors, loss, chunk_size=3, **options).backward()
        else:
            cached_step(model, tensors, loss, chunk_size=3, **options)
        return model.table.grad.numpy()

    kit.step = step
    return kit


def jax_kit(weights: np.ndarray) -> Kit:
    import jax
    import jax.numpy as jnp

    from gradcache_jax import cached_loss, cached_step, losses

    kit = Kit("jax", None, concat=lambda leaves: jnp.concatenate(leaves, axis=0), losses=losses)

    def pool(params, x):
        kit.widths.append(int(x["input_ids"].shape[1]))
        mask = x["attention_mask"][..., None].astype(params["table"].dtype)
        return jnp.tanh((params["table"][x["input_ids"]] * mask).sum(1) / mask.sum(1))

    def info_nce(q, p, scale: float = 1.0):
        scores = scale * q @ p.T
        return jnp.mean(jax.nn.logsumexp(scores, axis=1) - jnp.diag(scores))

    def step(groups, loss=info_nce, entry="cached_step", **options) -> np.ndarray:
        # float64 for this test only: the other tests in this process run JAX as users do
        with jax.enable_x64(True):
            params = {"table": jnp.asarray(weights)}
            arrays = [{k: jnp.asarray(v) for k, v in group.items()} for group in groups]
            if entry == "cached_loss":
                grads = jax.grad(cached_loss(pool, arrays, loss, chunk_size=3, **options))(params)
            else:
                _, grads = cached_step(pool, arrays, loss, chunk_size=3, params=params, **options)
            return np.asarray(grads["table"])

    kit.step = step
    return kit


def tf_kit(weights: np.ndarray) -> Kit:
    import tensorflow as tf

    from gradcache_tf import cached_loss, cached_step, losses

    kit = Kit("tf", None, concat=lambda leaves: tf.concat(leaves, axis=0), losses=losses)

    class Pool(tf.Module):
        def __init__(self):
            super().__init__()
            self.table = tf.Variable(weights)

        def __call__(self, input_ids, attention_mask):
            kit.widths.append(int(input_ids.shape[1]))
            mask = tf.cast(attention_mask, self.table.dtype)[..., None]
            rows = tf.gather(self.table, input_ids) * mask
            return tf.tanh(tf.reduce_sum(rows, 1) / tf.reduce_sum(mask, 1))

    def info_nce(q, p, scale: float = 1.0):
        scores = scale * tf.matmul(q, p, transpose_b=True)
        labels = tf.range(tf.shape(q)[0])
        return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, scores))

    def step(groups, loss=info_nce, entry="cached_step", **options) -> np.ndarray:
        model = Pool()
        tensors = [{k: tf.constant(v) for k, v in group.items()} for group in groups]
        if entry == "cached_loss":
            with tf.GradientTape() as tape:
                value = cached_loss(model, tensors, loss, chunk_size=3, **options)
            grads = tape.gradient(value, [model.table])
        else:
            _, grads = cached_step(model, tensors, loss, chunk_size=3, **options)
        return tf.convert_to_tensor(grads[0]).numpy()

    kit.step = step
    return kit


def mlx_kit(weights: np.ndarray) -> Kit:
    import mlx.core as mx
    import mlx.nn as nn

    from gradcache_mlx import cached_loss, cached_step, losses

    kit = Kit("mlx", None, concat=lambda leaves: mx.concatenate(leaves, axis=0), losses=losses)

    class Pool(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = mx.array(weights, dtype=mx.float64)

        def __call__(self, input_ids, attention_mask):
            kit.widths.append(int(input_ids.shape[1]))
            mask = attention_mask[..., None].astype(self.table.dtype)
            return mx.tanh((self.table[input_ids] * mask).sum(1) / mask.sum(1))

    def info_nce(q, p, scale: float = 1.0):
        scores = scale * q @ p.T
        return mx.mean(mx.logsumexp(scores, axis=1) - mx.diagonal(scores))

    def step(groups, loss=info_nce, entry="cached_step", **options) -> np.ndarray:
        model = Pool()
        tensors = [{k: mx.array(v) for k, v in group.items()} for group in groups]
        if entry == "cached_loss":
            _, grads = nn.value_and_grad(model, lambda: cached_loss(
                model, tensors, loss, chunk_size=3, **options))()
        else:
            _, grads = cached_step(model, tensors, loss, chunk_size=3, **options)
        return np.array(grads["table"])

    kit.step = step
    return kit


KITS = {"torch": ("torch", torch_kit), "jax": ("jax", jax_kit), "tf": ("tensorflow", tf_kit),
        "mlx": ("mlx", mlx_kit)}


@pytest.fixture(params=sorted(KITS))
def kit(request) -> Kit:
    module, make = KITS[request.param]
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"needs {module}")
    return make(np.random.default_rng(0).normal(size=(VOCAB, DIM)))


def _groups(seed: int = 1) -> list[dict[str, np.ndarray]]:
    return [padded_batch(seed), padded_batch(seed + 1)]


@pytest.mark.parametrize("options", [dict(pad_trim=True), dict(sort_by_length=True),
                                     dict(pad_trim=True, sort_by_length=True)],
                         ids=["pad_trim", "sort_by_length", "both"])
def test_trimming_and_sorting_keep_the_gradients_exactly(kit: Kit, options: dict) -> None:
    plain = kit.step(_groups())
    assert set(kit.widths) == {9}
    kit.widths.clear()
    changed = kit.step(_groups(), **options)
    np.testing.assert_allclose(changed, plain, rtol=1e-10, atol=1e-12)
    if options.get("pad_trim"):
        assert min(kit.widths) < 9, kit.widths   # some chunk was trimmed


def test_sorting_makes_trimming_cut_more(kit: Kit) -> None:
    kit.step(_groups(), pad_trim=True)
    trimmed_only = sum(kit.widths)
    kit.widths.clear()
    kit.step(_groups(), pad_trim=True, sort_by_length=True)
    assert sum(kit.widths) <= trimmed_only


def test_check_finite_refuses_a_non_finite_loss(kit: Kit) -> None:
    with pytest.raises(GradCacheError, match="not finite"):
        kit.step(_groups(), loss_kwargs={"scale": float("inf")}, check_finite=True)


def test_an_unknown_option_names_the_closest_one(kit: Kit) -> None:
    with pytest.raises(GradCacheError, match="did you mean 'check_finite'"):
        kit.step(_groups(), chek_finite=True)


@pytest.mark.parametrize("options, message", [
    (dict(pad_trim="yes"), "pad_trim must be True or False"),
    (dict(determinism_tolerance=-1.0), "determinism_tolerance must be"),
    (dict(loss_kwargs=[1]), "loss_kwargs must be a mapping"),
    (dict(distributed="nonsense-value-for-every-backend"), "distributed"),
], ids=["pad_trim", "tolerance", "loss_kwargs", "distributed"])
def test_bad_option_values_are_refused(kit: Kit, options: dict, message: str) -> None:
    if kit.name == "jax" and "distributed" in options:
        pytest.skip("on JAX a string names the shard_map axis: checked where it is used")
    with pytest.raises(GradCacheError, match=message):
        kit.step(_groups(), **options)


def test_progress_and_determinism_check_follow_an_eager_step(kit: Kit) -> None:
    plain = kit.step(_groups())
    checked = kit.step(_groups(), progress=True, check_determinism=True)
    np.testing.assert_allclose(checked, plain, rtol=1e-10, atol=1e-12)


def test_distributed_on_thread_ranks_shares_sum_to_the_global_gradient(kit: Kit) -> None:
    """``distributed=`` takes any ``gradcache.Collective``: here two threads of this process, each
    with half of every group's rows; the loss sees the global batch, and the ranks' gradients (each
    its own rows' share) add up to the one-process gradient of the whole batch."""
    if kit.name == "mlx":
        pytest.skip("gradcache_mlx runs in one process")
    groups = _groups()
    whole = kit.step(groups)

    def rank_step(rank: int, collective) -> np.ndarray:
        mine = [{k: v[rank * 5:(rank + 1) * 5] for k, v in group.items()} for group in groups]
        return kit.step(mine, distributed=collective, pad_trim=True)

    outcomes = run_ranks(2, rank_step, concat=kit.concat, timeout=60)
    errors = [error for _, error in outcomes if error is not None]
    assert not errors, errors
    np.testing.assert_allclose(outcomes[0][0] + outcomes[1][0], whole, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("entry", ["cached_step", "cached_loss"])
@pytest.mark.parametrize("rows", [8, 12], ids=["fewer", "more"])
def test_sorting_checks_every_leaf_has_the_rows_first(kit: Kit, rows: int, entry: str) -> None:
    # the permutation comes from the mask: a mask with fewer rows once dropped rows silently (the
    # loss saw 6 of 8), one with more raised a bare IndexError
    groups = _groups()
    mask = groups[0]["attention_mask"]
    groups[0] = {**groups[0], "attention_mask": np.concatenate([mask, mask])[:rows]}
    with pytest.raises(GradCacheError, match=rf"group 0: tensor leaves disagree on the batch size.*"
                                             rf"attention_mask: \({rows}, 9\)"):
        kit.step(groups, sort_by_length=True, entry=entry)


def test_pad_trim_refuses_a_leaf_it_cannot_tell_is_per_token(kit: Kit) -> None:
    # a (rows, L) feature that is not per-token was once cut with the tokens, silently
    groups = _groups()
    groups[0] = {**groups[0], "extra": np.ones(groups[0]["input_ids"].shape)}
    with pytest.raises(GradCacheError, match="cannot tell whether 'extra'"):
        kit.step(groups, pad_trim=True)


def test_a_number_is_not_a_distributed_value(kit: Kit) -> None:
    with pytest.raises(GradCacheError, match="distributed= takes"):
        kit.step(_groups(), distributed=0)


def test_the_options_object_lists_one_spelling() -> None:
    from gradcache import StepOptions
    assert StepOptions.names() == ("get_rep", "loss_kwargs", "split_fn", "pad_trim",
                                   "sort_by_length", "check_finite", "check_determinism",
                                   "determinism_tolerance", "progress", "distributed")


def test_split_fn_with_pad_trim_is_refused() -> None:
    from gradcache import StepOptions
    with pytest.raises(GradCacheError, match="split_fn"):
        StepOptions(split_fn=lambda group, size: [group], pad_trim=True)




@pytest.mark.parametrize("adapter", ["gradcache_torch", "gradcache_jax", "gradcache_tf",
                                     "gradcache_mlx"])
def test_an_unknown_option_of_cached_loss_names_cached_loss(adapter) -> None:
    module = importlib.import_module(adapter)
    with pytest.raises(GradCacheError, match=rf"chek_finite.*check_finite.*{adapter}\.cached_loss takes"):
        module.cached_loss(lambda x: x, (np.ones((2, 2)),), lambda r: r.sum(), chunk_size=1,
                           chek_finite=True)


# -- bad input (issue 13): every case refused alike through both entry points --------------------
ENTRIES = ["cached_step", "cached_loss"]


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("options, message", [
    (dict(loss=None), "loss_fn must be callable"),
    (dict(loss_kwargs=[1]), "loss_kwargs must be a mapping"),
    (dict(determinism_tolerance="abc"), "determinism_tolerance must be a finite number >= 0, "
                                        "got 'abc'"),
    (dict(determinism_tolerance=-1, check_determinism=True),
     "determinism_tolerance must be a finite number >= 0, got -1"),
    (dict(split_fn=lambda group, size: [{k: v[:3] for k, v in group.items()}]),
     "split_fn cut group 0 of 10 rows into chunks of 3 = 3 rows"),
], ids=["loss_fn-None", "loss_kwargs-list", "tolerance-str", "tolerance-negative",
        "split_fn-drops"])
def test_bad_input_is_refused_before_pass_1(kit: Kit, options: dict, message: str,
                                            entry: str) -> None:
    with pytest.raises(GradCacheError, match=message):
        kit.step(_groups(), entry=entry, **options)
    assert kit.widths == [], "an encoder ran before the bad input was refused"


@pytest.mark.parametrize("entry", ENTRIES)
def test_an_error_in_the_loss_gets_a_note_through_either_entry(kit: Kit, entry: str) -> None:
    def loss(q, p, labels):
        raise KeyError(f"label {len(labels)}")

    with pytest.raises(KeyError, match="label 7") as raised:
        kit.step(_groups(), loss=loss, entry=entry, loss_kwargs={"labels": np.arange(7)})
    notes = "\n".join(getattr(raised.value, "__notes__", []))
    assert "raised in loss_fn on the full batch, with representations of group 0 (10, 5), " \
           "group 1 (10, 5)" in notes, notes


def _poisoned_info_nce(kit: Kit, poison: str) -> Callable:
    """The tiled InfoNCE made non-finite by a tensor: NaN or infinite representations, or a
    temperature tensor holding NaN."""
    def loss(q, p):
        if poison == "nan-temperature-tensor":
            return kit.losses.info_nce(q, p, temperature=q[0, 0] * 0 + float("nan"))
        return kit.losses.info_nce(q * float(poison.split("-")[0]), p, temperature=0.5)
    return loss


# (the JAX tiled loss runs op by op here, about a second a step: few cases)
@pytest.mark.parametrize("entry, poison", [("cached_step", "nan-temperature-tensor"),
                                           ("cached_loss", "inf-representations")])
def test_check_finite_catches_a_tiled_loss_made_non_finite_by_a_tensor(
        kit: Kit, entry: str, poison: str) -> None:
    """A *tensor* that makes a tiled loss NaN is not read up front (it may be traced or learnt):
    ``check_finite`` raises before any gradient is returned."""
    with pytest.raises(GradCacheError, match="the loss is not finite"):
        kit.step(_groups(), loss=_poisoned_info_nce(kit, poison), entry=entry, check_finite=True)


def test_without_check_finite_a_non_finite_loss_gives_nan_gradients(kit: Kit) -> None:
    # what the docs say: without check_finite the step runs, and its gradients are NaN
    assert np.isnan(kit.step(_groups(), loss_kwargs={"scale": float("nan")})).all()
