"""``across_ranks`` for JAX (a mesh axis inside ``jax.shard_map``) and TensorFlow (the replicas of a
``MirroredStrategy``): each device or replica passes its own rows and gets the global batch's loss
and gradients, equal to the dense loss on the concatenated batch (float64, relative error <= 1e-10).

Several devices must be configured before JAX or TensorFlow starts, and the rest of the suite has
started both with one; so the checks run in two child processes (this file run as a script, ``jax``
or ``tf``), started together, each printing one JSON line of measured errors. JAX: 2 and 4 CPU
devices, the three losses with their learnable parameters, type checks on and off, and one
``cached_step(mesh=...)``. TF: 2 logical CPU devices, the three losses eagerly with uneven rows and
inside ``tf.function`` with equal ones, and one ``cached_step(distributed=True)`` whose per-replica
shares sum to one device's gradient. Each child also runs the distributed examples of
``docs/losses.md`` for its framework (see tests/docs/blocks.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOLERANCE = 1e-10
CHILD_TIMEOUT_S = 180
PARAMS = {"info_nce": {"temperature": 0.3}, "clip_loss": {"logit_scale": 2.5},
          "siglip_loss": {"logit_scale": 1.5, "logit_bias": -2.0}}


def _error(actual, expected) -> float:
    import numpy as np

    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    scale = float(np.max(np.abs(expected), initial=0.0))
    diff = float(np.max(np.abs(actual - expected), initial=0.0))
    return diff / scale if scale > 0 else diff


def _data(loss: str, rows: int, seed: int, dim: int = 5, negatives: int = 2):
    import numpy as np

    rng = np.random.default_rng(seed)
    group = 1 + negatives if loss == "info_nce" else 1
    return rng.normal(size=(rows, dim)), rng.normal(size=(rows * group, dim)), group


# -- the JAX child: 4 CPU devices --------------------------------------------------------------------

def _jax_child() -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    jax.config.update("jax_enable_x64", True)
    import gradcache_jax
    from gradcache import GradCacheError
    from gradcache_jax import losses
    from tests.jax.common import batch, max_relative_error, tower, tower_params

    assert len(jax.devices()) == 4, jax.devices()
    out: dict = {}

    def one(loss: str, world: int, rows: int, tile: int, similarity: str, check_vma: bool) -> dict:
        x, y, _ = _data(loss, world * rows, seed=world * 10 + rows)
        x, y = jnp.asarray(x), jnp.asarray(y)
        names = sorted(PARAMS[loss])
        params = {name: jnp.asarray(value, jnp.float64) for name, value in PARAMS[loss].items()}
        tiled, dense = getattr(losses, loss), getattr(losses, f"{loss}_dense")
        mesh = Mesh(np.array(jax.devices()[:world]), ("batch",))
        across = losses.across_ranks(tiled, axis_name="batch", similarity=similarity,
                                     tile_size=tile)

        def local(x, y, params):
            return jax.value_and_grad(lambda x, y, p: across(x, y, **p), argnums=(0, 1, 2))(
                x, y, params)

        sharded = jax.jit(jax.shard_map(
            local, mesh=mesh, in_specs=(P("batch"), P("batch"), P()),
            out_specs=(P(), (P("batch"), P("batch"), P())), check_vma=check_vma))
        value, (dx, dy, dp) = sharded(x, y, params)
        want, (wx, wy, wp) = jax.value_and_grad(
            lambda x, y, p: dense(x, y, similarity=similarity, **p), argnums=(0, 1, 2))(
                x, y, params)
        errors = {"value": _error(value, want), "x": _error(dx, wx), "y": _error(dy, wy)}
        errors.update({name: _error(dp[name], wp[name]) for name in names})
        return errors

    cases = {}
    for world in (2, 4):
        for index, loss in enumerate(PARAMS):
            # uneven tiles (the last one moved back and masked), both similarities
            cases[f"{loss}_{world}"] = one(loss, world, rows=3 + index, tile=2,
                                           similarity=("dot", "cosine")[index % 2], check_vma=True)
    cases["info_nce_4_unchecked"] = one("info_nce", 4, rows=3, tile=4, similarity="dot",
                                        check_vma=False)
    out["losses"] = cases

    # the loss of a distributed cached step vs the full-batch step of one device
    mesh = Mesh(np.array(jax.devices()), ("batch",))
    params = tower_params(seed=3)
    q, d = batch(8, seed=4), batch(16, seed=5)   # one hard negative per query

    def full(params):
        return losses.info_nce_dense(tower(params, q), tower(params, d), temperature=0.2)

    want_loss, want_grads = jax.jit(jax.value_and_grad(full))(params)
    loss_fn = losses.across_ranks(losses.info_nce, axis_name="batch", temperature=0.2, tile_size=3)
    loss, grads = jax.jit(lambda p: gradcache_jax.cached_step(
        tower, (q, d), loss_fn, chunk_size=[1, 3], params=p, distributed=mesh))(params)
    out["cached_step"] = {"loss": _error(loss, want_loss),
                          "grads": float(max_relative_error(grads, want_grads))}

    # a learnable temperature through loss_takes_params (needs the step to keep gathers_itself)
    params = dict(tower_params(seed=3), log_t=jnp.asarray(-1.5, jnp.float64))

    def full_t(params):
        return losses.info_nce_dense(tower(params, q), tower(params, d),
                                     temperature=jnp.exp(params["log_t"]))

    def learnable(params, q_rep, d_rep):
        return loss_fn(q_rep, d_rep, temperature=jnp.exp(params["log_t"]))

    learnable.gathers_itself = True
    want_loss, want_grads = jax.jit(jax.value_and_grad(full_t))(params)
    try:
        loss, grads = jax.jit(lambda p: gradcache_jax.cached_step(
            tower, (q, d), learnable, chunk_size=2, params=p, distributed=mesh,
            loss_takes_params=True))(params)
    except GradCacheError as error:
        out["cached_step_temperature"] = {"error": str(error)}
    else:
        out["cached_step_temperature"] = {"loss": _error(loss, want_loss),
                                          "grads": float(max_relative_error(grads, want_grads))}
    out["docs"] = _docs_blocks("jax")
    return out


# -- the TF child: 2 logical CPU devices -------------------------------------------------------------

def _tf_child() -> dict:
    import numpy as np
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from gradcache_tf import cached_step, losses

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])

    def split(a, counts, group=1):
        starts = np.cumsum([0, *counts]) * group
        return strategy.experimental_distribute_values_from_function(
            lambda ctx: a[starts[ctx.replica_id_in_sync_group]:
                          starts[ctx.replica_id_in_sync_group + 1]])

    def local(value):
        return [np.asarray(v) for v in strategy.experimental_local_results(value)]

    def one(loss: str, counts: list, compiled: bool, similarity: str) -> dict:
        x, y, group = _data(loss, sum(counts), seed=sum(counts) + len(loss))
        x, y = tf.constant(x), tf.constant(y)
        names = sorted(PARAMS[loss])
        with strategy.scope():
            variables = {name: tf.Variable(tf.constant(value, tf.float64))
                         for name, value in PARAMS[loss].items()}
        across = losses.across_ranks(getattr(losses, loss), similarity=similarity, tile_size=2,
                                     **variables)

        def step(a, b):
            with tf.GradientTape() as tape:
                tape.watch([a, b])
                value = across(a, b)
            return (value, *tape.gradient(value, [a, b] + [variables[n] for n in names]))

        def run(a, b):
            return strategy.run(step, args=(a, b))

        got = (tf.function(run) if compiled else run)(split(x, counts), split(y, counts, group))
        with tf.GradientTape() as tape:
            tape.watch([x, y])
            want = getattr(losses, f"{loss}_dense")(x, y, similarity=similarity, **variables)
        wants = tape.gradient(want, [x, y] + [variables[n] for n in names])
        values, dx, dy, *dp = (local(part) for part in got)
        errors = {"value": max(_error(v, want) for v in values),
                  "x": _error(np.concatenate(dx), wants[0]),
                  "y": _error(np.concatenate(dy), wants[1])}
        # a parameter's gradient: the global one, the same on every replica
        errors.update({name: max(_error(g, w) for g in grads)
                       for name, grads, w in zip(names, dp, wants[2:])})
        return errors

    out: dict = {"losses": {}}
    for index, loss in enumerate(PARAMS):
        similarity = ("dot", "cosine")[index % 2]
        out["losses"][f"{loss}_eager_uneven"] = one(loss, [3, 5], False, similarity)
        out["losses"][f"{loss}_graph"] = one(loss, [4, 4], True, similarity)

    # cached_step(distributed=True): shares summed over the replicas vs one device
    def tower():
        return tf.keras.Sequential([tf.keras.Input((6,), dtype="float64"),
                                    tf.keras.layers.Dense(4, activation="tanh", dtype="float64")])

    rng = np.random.default_rng(7)
    for name, counts, compiled in (("eager_uneven", [5, 3], False), ("graph", [4, 4], True)):
        with strategy.scope():
            encoder = tower()
            temperature = tf.Variable(tf.constant(0.2, tf.float64))
        loss_fn = losses.across_ranks(losses.info_nce, temperature=temperature, tile_size=3)
        q = tf.constant(rng.normal(size=(sum(counts), 6)))
        p = tf.constant(rng.normal(size=(2 * sum(counts), 6)))    # one hard negative per query
        variables = list(encoder.trainable_variables) + [temperature]
        with tf.GradientTape() as tape:
            want_loss = losses.info_nce_dense(encoder(q), encoder(p), temperature=temperature)
        want = tape.gradient(want_loss, variables)

        def step(a, b, encoder=encoder, loss_fn=loss_fn):
            return cached_step(encoder, (a, b), loss_fn, chunk_size=2, distributed=True)

        def run(a, b):
            return strategy.run(step, args=(a, b))

        loss, grads = (tf.function(run) if compiled else run)(split(q, counts), split(p, counts, 2))
        shares = [local(g) for g in grads]
        out[f"cached_step_{name}"] = {
            "loss": max(_error(v, want_loss) for v in local(loss)),
            "grads": max(_error(sum(s), w) for s, w in zip(shares[:-1], want[:-1])),
            "temperature": _error(sum(shares[-1]), want[-1]),
            "variables_found": len(shares) == len(variables)}
    # One strategy per process, as in tests/tf/test_distributed.py's docs check: Keras' global
    # SeedGenerator, which the step snapshots, belongs to the strategy it was created under. So
    # the examples' `tf.distribute.MirroredStrategy()` is this child's two-replica strategy.
    mirrored = tf.distribute.MirroredStrategy
    tf.distribute.MirroredStrategy = lambda *args, **kwargs: (
        strategy if not (args or kwargs) else mirrored(*args, **kwargs))
    try:
        out["docs"] = _docs_blocks("tensorflow")
    finally:
        tf.distribute.MirroredStrategy = mirrored
    return out


def _docs_blocks(framework: str) -> dict:
    """The documentation's blocks whose directive names this file and that import ``framework``
    (docs/losses.md's across_ranks examples), run on this child's devices: "ok" or the error."""
    import re

    from tests.docs.blocks import chain_id, chains_run_in, run_chain

    done = {}
    for chain in chains_run_in(__file__):
        if re.search(rf"^(import|from) {framework}\b", chain[0].code, re.M):
            try:
                run_chain(chain)
                done[chain_id(chain)] = "ok"
            except Exception:  # noqa: BLE001 - reported to the parent
                done[chain_id(chain)] = traceback.format_exc()
    return done


def _main(which: str) -> None:
    start = time.monotonic()
    try:
        results = _jax_child() if which == "jax" else _tf_child()
    except Exception:  # noqa: BLE001 - reported to the parent
        results = {"error": traceback.format_exc()}
    results["seconds"] = time.monotonic() - start
    print(json.dumps(results))


# -- the parent: pytest -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def children() -> dict:
    """Both children, started together; ``{"jax": results, "tf": results}`` (a reason to skip
    where a framework is missing)."""
    base = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", KERAS_BACKEND="tensorflow",
                PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    envs = {"jax": dict(base, JAX_PLATFORMS="cpu", XLA_FLAGS=(
                base.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()),
            "tf": base}
    started, results = {}, {}
    for which, module in (("jax", "jax"), ("tf", "tensorflow")):
        try:
            __import__(module)
        except ImportError:
            results[which] = {"skip": f"{module} is not installed"}
            continue
        started[which] = subprocess.Popen([sys.executable, __file__, which], cwd=ROOT,
                                          env=envs[which], stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    for which, child in started.items():
        try:
            stdout, stderr = child.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            stdout, stderr = child.communicate()
            results[which] = {"error": f"no result within {CHILD_TIMEOUT_S} s:\n{stderr[-3000:]}"}
            continue
        lines = [line for line in stdout.splitlines() if line.startswith("{")]
        results[which] = (json.loads(lines[-1]) if lines else
                          {"error": f"rc {child.returncode}:\n{stderr[-3000:]}"})
    return results


def _of(children: dict, which: str) -> dict:
    result = children[which]
    if "skip" in result:
        pytest.skip(result["skip"])
    assert "error" not in result, result["error"]
    return result


def _assert_exact(errors: dict) -> None:
    for name, case in errors.items():
        assert max(case.values()) <= TOLERANCE, (name, case)


def test_jax_losses_equal_the_dense_loss_of_the_global_batch(children) -> None:
    cases = _of(children, "jax")["losses"]
    assert {name.split("_")[-1] for name in cases} >= {"2", "4"}
    assert {key for case in cases.values() for key in case} >= {
        "value", "x", "y", "temperature", "logit_scale", "logit_bias"}
    _assert_exact(cases)


def test_jax_cached_step_with_across_ranks_equals_the_full_batch_step(children) -> None:
    _assert_exact({"cached_step": _of(children, "jax")["cached_step"]})


def test_jax_cached_step_with_a_learnable_temperature(children) -> None:
    result = _of(children, "jax")["cached_step_temperature"]
    _assert_exact({"cached_step_temperature": result})


def test_tf_losses_equal_the_dense_loss_of_the_global_batch(children) -> None:
    cases = _of(children, "tf")["losses"]
    assert any("uneven" in name for name in cases) and any("graph" in name for name in cases)
    _assert_exact(cases)


@pytest.mark.parametrize("case", ["eager_uneven", "graph"])
def test_tf_cached_step_shares_sum_to_one_device(children, case) -> None:
    result = dict(_of(children, "tf")[f"cached_step_{case}"])
    assert result.pop("variables_found"), "the temperature variable was not differentiated"
    _assert_exact({case: result})


@pytest.mark.parametrize("which", ["jax", "tf"])
def test_the_losses_guide_s_distributed_examples_run(children, which) -> None:
    docs = _of(children, which)["docs"]
    assert docs and set(docs.values()) == {"ok"}, docs


if __name__ == "__main__":
    _main(sys.argv[1])
