"""The distributed cached step on a mesh of CPU devices: the global batch's loss and gradients.

A sharded step (each device holding its rows, several chunks each) must return, on every device,
what one process computes on the whole global batch: the full-batch ``jax.value_and_grad`` (or,
with dropout, a chunk-by-chunk forward drawn with the keys each device's chunks receive), to float64
relative error <= 1e-10 -- a learnable temperature included, whose gradient must not be summed over
the devices.

Several CPU devices need ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` before JAX starts,
and the rest of the suite has started it with one. So the checks that need devices run in a child
process (this file, run as a script), once for the module, with a timeout; the child loops over a
few random configurations (world size, rows per device, chunk sizes, groups of different sizes,
dropout, a learnable temperature, jit or eager) and reports its errors as JSON. The checks that one
device can make run here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEVICES = 4
TOLERANCE = 1e-10
CHILD_TIMEOUT_S = 360   # a shared 2-core machine: compiles of several programs


# -- the child: runs with DEVICES CPU devices ---------------------------------------------------------

def _child_configs(count: int, seed: int) -> list[dict]:
    """Random configurations, the first ones chosen to cover every feature at least once."""
    import numpy as np

    rng = np.random.default_rng(seed)
    fixed = [
        # world, rows per device (queries; passages are `ratio` times as many), chunks, features
        dict(world=4, rows=5, ratio=1, chunks=(2, 3), dropout=True, temperature=True, jit=True),
        dict(world=2, rows=6, ratio=2, chunks=(4, 5), dropout=False, temperature=True, jit=True),
        dict(world=4, rows=3, ratio=2, chunks=(2, 4), dropout=True, temperature=False, jit=False),
    ]
    drawn = [dict(world=int(rng.choice([2, 4])), rows=int(rng.integers(1, 6)),
                  ratio=int(rng.integers(1, 3)),
                  chunks=tuple(int(c) for c in rng.integers(1, 5, size=2)),
                  dropout=bool(rng.integers(2)), temperature=bool(rng.integers(2)), jit=True)
             for _ in range(max(0, count - len(fixed)))]
    return (fixed + drawn)[:count]


def _child(count: int, seed: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, PartitionSpec

    import gradcache_jax
    from gradcache import GradCacheError
    from tests.jax.common import batch, jit, max_relative_error, tower, tower_params

    jax.config.update("jax_enable_x64", True)
    assert len(jax.devices()) == DEVICES, jax.devices()

    def loss_fn(params, q, d):
        scale = jnp.exp(params["log_t"]) if "log_t" in params else 2.0
        scores = scale * q @ d.T   # q has k times fewer rows than d: row i matches d[i * k]
        k = d.shape[0] // q.shape[0]
        positives = scores[jnp.arange(q.shape[0]), jnp.arange(q.shape[0]) * k]
        return jnp.mean(jax.nn.logsumexp(scores, axis=1) - positives)

    def errors(got, want) -> dict:
        (loss, grads), (want_loss, want_grads) = got, want
        return {"loss": abs(float(loss) - float(want_loss)) / max(1.0, abs(float(want_loss))),
                "grads": float(max_relative_error(grads, want_grads))}

    def run_config(index: int, config: dict) -> dict:
        world, chunks = config["world"], config["chunks"]
        mesh = Mesh(np.array(jax.devices()[:world]), ("batch",))
        params = tower_params(seed=index)
        if config["temperature"]:
            params["log_t"] = jnp.asarray(0.4, jnp.float64)
        q = batch(world * config["rows"], seed=10 + index)
        d = batch(world * config["rows"] * config["ratio"], seed=20 + index)
        rng = jax.random.key(index) if config["dropout"] else None
        takes = config["temperature"]
        loss = loss_fn if takes else (lambda q, d: loss_fn({}, q, d))

        def sharded(params, q, d, rng):
            return gradcache_jax.cached_step(tower, (q, d), loss, chunk_size=list(chunks),
                                             params=params, rng=rng, loss_takes_params=takes,
                                             distributed=mesh, check_finite=index == 0)

        got = (jit(sharded) if config["jit"] else sharded)(params, q, d, rng)

        # the reference: one process, the whole global batch; with dropout, chunk by chunk with
        # the key each device gives its chunk: chunk_key(fold_in(rng, device), group, chunk)
        def encode_global(params, x, group, chunk):
            if rng is None:
                return tower(params, x)
            local = x.shape[0] // world
            parts = []
            for device in range(world):
                rows = x[device * local:(device + 1) * local]
                key = jax.random.fold_in(rng, device)
                parts += [tower(params, rows[s:s + chunk], gradcache_jax.chunk_key(key, group, i))
                          for i, s in enumerate(range(0, local, chunk))]
            return jnp.concatenate(parts)

        def reference(params):
            reps = [encode_global(params, x, g, c) for g, (x, c) in enumerate(zip((q, d), chunks))]
            return loss_fn(params, *reps)

        want = jit(jax.value_and_grad(reference))(params)
        case = dict(config, **errors(got, want))
        if not config["dropout"] and index == 1:
            # and the single-device cached step of the same batch
            single = jit(lambda p, q, d: gradcache_jax.cached_step(
                tower, (q, d), loss, chunk_size=list(chunks), params=p, loss_takes_params=takes))
            case["single_device"] = errors(got, single(params, q, d))
        return case

    results: dict = {"cases": [run_config(index, config)
                               for index, config in enumerate(_child_configs(count, seed))],
                     "errors": {}}

    # the same step inside the user's own shard_map, type checks on and off, over two mesh axes
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("hosts", "local"))
    params = dict(tower_params(seed=7), log_t=jnp.asarray(0.1, jnp.float64))
    q, d = batch(8, seed=30), batch(8, seed=31)
    want = jit(jax.value_and_grad(lambda p: loss_fn(p, tower(p, q), tower(p, d))))(params)
    split = PartitionSpec(("hosts", "local"))
    for check in (True, False):
        body = jax.shard_map(
            lambda p, q, d: gradcache_jax.cached_step(tower, (q, d), loss_fn, chunk_size=1,
                                                      params=p, loss_takes_params=True,
                                                      distributed=("hosts", "local")),
            mesh=mesh, in_specs=(PartitionSpec(), split, split), out_specs=PartitionSpec(),
            check_vma=check)
        results[f"user_shard_map_check_vma_{check}"] = errors(jit(body)(params, q, d), want)
    # cached_loss: on a mesh (dropout, temperature, a scaled loss) and inside the user's shard_map
    mesh = Mesh(np.array(jax.devices()), ("batch",))
    rng = jax.random.key(5)
    cached = jit(lambda p, q, d: gradcache_jax.cached_step(
        tower, (q, d), loss_fn, chunk_size=1, params=p, rng=rng, loss_takes_params=True,
        distributed=mesh))(params, q, d)
    want_scaled = (3.0 * cached[0], jax.tree_util.tree_map(lambda g: 3.0 * g, cached[1]))
    on_mesh = jit(lambda p, q, d: jax.value_and_grad(lambda p: 3.0 * gradcache_jax.cached_loss(
        tower, (q, d), loss_fn, chunk_size=1, rng=rng, loss_takes_params=True,
        distributed=mesh)(p))(p))
    results["cached_loss_mesh"] = errors(on_mesh(params, q, d), want_scaled)
    plain = jit(lambda p, q, d: gradcache_jax.cached_loss(
        tower, (q, d), loss_fn, chunk_size=1, rng=rng, loss_takes_params=True,
        distributed=mesh)(p))
    results["cached_loss_mesh_plain"] = errors((plain(params, q, d), cached[1]), cached)
    for check in (True, False):
        def grad_inside(p, q, d):
            f = gradcache_jax.cached_loss(tower, (q, d), loss_fn, chunk_size=1, rng=rng,
                                          loss_takes_params=True, distributed="batch")
            return jax.value_and_grad(lambda p: 3.0 * f(p))(p)

        body = jax.shard_map(grad_inside, mesh=mesh,
                             in_specs=(PartitionSpec(), PartitionSpec("batch"), PartitionSpec("batch")),
                             out_specs=PartitionSpec(), check_vma=check)
        results[f"cached_loss_user_shard_map_check_vma_{check}"] = errors(jit(body)(params, q, d),
                                                                          want_scaled)

    # an explicit-sharding mesh, as jax.make_mesh builds by default
    explicit = jax.make_mesh((DEVICES,), ("batch",))
    step = jit(lambda p, q, d: gradcache_jax.cached_step(
        tower, (q, d), loss_fn, chunk_size=1, params=p, loss_takes_params=True, distributed=explicit))
    results["explicit_mesh"] = errors(step(params, q, d), want)

    # errors, raised before anything runs
    mesh = Mesh(np.array(jax.devices()), ("batch",))
    for name, rows in (("first_group", (6, 8)), ("second_group", (8, 10))):
        try:
            gradcache_jax.cached_step(tower, (batch(rows[0]), batch(rows[1])),
                                      lambda q, d: jnp.sum(q), chunk_size=2,
                                      params=tower_params(), distributed=mesh)
        except GradCacheError as error:
            results["errors"][name] = str(error)
        else:
            results["errors"][name] = None
    # check_finite on several devices: a host check per device, failing the compiled call
    try:
        jax.block_until_ready(jit(lambda p, q, d: gradcache_jax.cached_step(
            tower, (q, d), lambda q, d: jnp.sum(q) * jnp.nan, chunk_size=1, params=p,
            distributed=mesh, check_finite=True))(tower_params(), batch(8), batch(8)))
    except Exception as error:
        results["errors"]["not_finite"] = f"{type(error).__name__}: {error}"
    else:
        results["errors"]["not_finite"] = None
    return results


# -- the parent: pytest -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def child_results() -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        f" --xla_force_host_platform_device_count={DEVICES}").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    try:
        done = subprocess.run([sys.executable, __file__, "5", "0"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"the {DEVICES}-device child did not finish within {CHILD_TIMEOUT_S} s:\n"
                    f"{error.stderr}")
    if done.returncode != 0:
        pytest.fail(f"the {DEVICES}-device child failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_sharded_step_is_the_global_batch_step(child_results):
    cases = child_results["cases"]
    assert {case["world"] for case in cases} == {2, 4}
    assert any(case["dropout"] and case["temperature"] for case in cases)
    for case in cases:
        assert case["loss"] <= TOLERANCE and case["grads"] <= TOLERANCE, case


def test_the_sharded_step_equals_the_single_device_cached_step(child_results):
    (case,) = [case for case in child_results["cases"] if "single_device" in case]
    assert case["single_device"]["loss"] <= TOLERANCE, case
    assert case["single_device"]["grads"] <= TOLERANCE, case


@pytest.mark.parametrize("check_vma", [True, False])
def test_inside_the_users_shard_map_over_two_axes(child_results, check_vma):
    result = child_results[f"user_shard_map_check_vma_{check_vma}"]
    assert result["loss"] <= TOLERANCE and result["grads"] <= TOLERANCE, result


@pytest.mark.parametrize("case", ["cached_loss_mesh", "cached_loss_mesh_plain",
                                  "cached_loss_user_shard_map_check_vma_True",
                                  "cached_loss_user_shard_map_check_vma_False"])
def test_cached_loss_on_a_mesh_is_the_sharded_cached_step(child_results, case):
    """jax.value_and_grad of 3 * cached_loss(distributed=...) is 3 * the sharded cached_step
    (same keys, a loss-owned temperature whose gradient is scaled once, not summed over devices)."""
    result = child_results[case]
    assert result["loss"] <= TOLERANCE and result["grads"] <= TOLERANCE, result


def test_an_explicit_sharding_mesh(child_results):
    result = child_results["explicit_mesh"]
    assert result["loss"] <= TOLERANCE and result["grads"] <= TOLERANCE, result


def test_a_batch_the_devices_cannot_share_is_refused(child_results):
    messages = child_results["errors"]
    assert messages["first_group"] is not None and messages["second_group"] is not None
    assert "input group 0 has 6 rows" in messages["first_group"]
    assert "4 devices of mesh axis 'batch'" in messages["first_group"]
    assert "input group 1 has 10 rows" in messages["second_group"]


def test_check_finite_fails_the_sharded_step(child_results):
    message = child_results["errors"]["not_finite"]
    assert message is not None and "the loss is not finite" in message


# -- one device is enough for these ------------------------------------------------------------------

def test_a_one_device_mesh_is_the_cached_step():
    import jax
    import numpy as np
    from jax.sharding import Mesh

    from gradcache_jax import cached_step
    from tests.jax.common import batch, info_nce, jit, max_relative_error, tower, tower_params

    mesh = Mesh(np.array(jax.devices()[:1]), ("batch",))
    params, q, d = tower_params(), batch(10), batch(10, seed=2)
    got = jit(lambda p, q, d: cached_step(tower, (q, d), info_nce, chunk_size=3, params=p,
                                          distributed=mesh))(params, q, d)
    want = jit(jax.value_and_grad(lambda p: info_nce(tower(p, q), tower(p, d))))(params)
    assert max_relative_error(got, want) <= TOLERANCE


def test_an_axis_name_outside_shard_map_is_an_error():
    from gradcache import GradCacheError
    from gradcache_jax import cached_step
    from tests.jax.common import batch, info_nce, tower, tower_params

    with pytest.raises(GradCacheError, match="inside jax.shard_map"):
        cached_step(tower, (batch(4), batch(4)), info_nce, chunk_size=2, params=tower_params(),
                    distributed="batch")


def test_a_mesh_of_several_axes_needs_the_axis_name():
    import jax
    import numpy as np
    from jax.sharding import Mesh

    from gradcache import GradCacheError
    from gradcache_jax import cached_step
    from tests.jax.common import batch, info_nce, tower, tower_params

    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    with pytest.raises(GradCacheError, match="pass axis_name="):
        cached_step(tower, (batch(4), batch(4)), info_nce, chunk_size=2, params=tower_params(),
                    distributed=mesh)
    with pytest.raises(GradCacheError, match="not an axis of the mesh"):
        cached_step(tower, (batch(4), batch(4)), info_nce, chunk_size=2, params=tower_params(),
                    distributed=mesh, axis_name="rows")


def test_the_old_spellings_still_work_with_a_warning():
    import jax
    import numpy as np
    from jax.sharding import Mesh, PartitionSpec

    from gradcache_jax import cached_step
    from tests.jax.common import batch, info_nce, tower, tower_params

    mesh = Mesh(np.array(jax.devices()[:1]), ("batch",))
    q, d = batch(4), batch(4)

    def step(**spelling):
        # under jit: one compile per spelling instead of an eager mesh step's many (10x faster);
        # the warning comes when the step is traced
        return jax.jit(lambda p, q, d: cached_step(tower, (q, d), info_nce, chunk_size=2,
                                                   params=p, **spelling))(tower_params(), q, d)[1]

    new = step(distributed=mesh)
    with pytest.warns(DeprecationWarning, match="pass distributed=m"):
        old = step(mesh=mesh)
    everywhere = step(distributed=True)
    for name in new:
        np.testing.assert_allclose(old[name], new[name], rtol=1e-12)
        np.testing.assert_allclose(everywhere[name], new[name], rtol=1e-12)

    def device_step(p, q, d):
        return cached_step(tower, (q, d), info_nce, chunk_size=2, params=p, axis_name="batch")

    with pytest.warns(DeprecationWarning, match="pass distributed=a"):
        jax.jit(jax.shard_map(device_step, mesh=mesh,
                              in_specs=(PartitionSpec(), PartitionSpec("batch"),
                                        PartitionSpec("batch")),
                              out_specs=PartitionSpec()))(tower_params(), q, d)


def test_distributed_true_names_its_axis_and_a_collective_takes_no_mesh():
    import jax
    import numpy as np
    from jax.sharding import Mesh

    from gradcache import GradCacheError
    from gradcache.testing import ThreadCollective
    from gradcache.testing._threads import _Board
    from gradcache_jax import cached_step
    from tests.jax.common import batch, info_nce, tower, tower_params

    q, d = batch(4), batch(4)
    _, named = cached_step(tower, (q, d), info_nce, chunk_size=2, params=tower_params(),
                           distributed=True, axis_name="rows")
    _, plain = cached_step(tower, (q, d), info_nce, chunk_size=2, params=tower_params())
    for name in plain:
        np.testing.assert_allclose(named[name], plain[name], rtol=1e-6)
    with pytest.raises(GradCacheError, match="a string"):
        cached_step(tower, (q, d), info_nce, chunk_size=2, params=tower_params(),
                    distributed=True, axis_name=("a", "b"))
    collective = ThreadCollective(_Board(1, 5.0), 0)
    mesh = Mesh(np.array(jax.devices()[:1]), ("batch",))
    with pytest.raises(GradCacheError, match="cannot be combined"):
        cached_step(tower, (q, d), info_nce, chunk_size=2, params=tower_params(),
                    distributed=collective, axis_name="batch")
    with pytest.raises(GradCacheError, match="cannot be combined"):
        cached_step(tower, (q, d), info_nce, chunk_size=2, params=tower_params(),
                    distributed=collective, mesh=mesh)


if __name__ == "__main__":
    print(json.dumps(_child(int(sys.argv[1]), int(sys.argv[2]))))
