"""``cached_step(..., distributed=True)`` (and ``cached_loss``, and ``GradCacheModel.fit``) under ``tf.distribute.MirroredStrategy`` on two logical CPU
devices, against one device running the global batch (float64, relative error <= 1e-10).

Logical devices must be configured before TensorFlow starts its runtime, and the rest of the suite
uses TensorFlow in this pytest process, so every check runs in one subprocess: this file run as a
script. It prints one JSON line of measurements per check; the tests below assert on them.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time
import traceback

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
TOLERANCE = 1e-10


@pytest.fixture(scope="module")
def checks() -> dict:
    pytest.importorskip("tensorflow")
    pytest.importorskip("keras")
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, __file__], capture_output=True, text=True, timeout=240,
                          cwd=ROOT, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        pytest.fail(f"the distributed checks failed to run (rc {done.returncode}):\n"
                    f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    results = json.loads(lines[-1])
    if results.get("skip"):
        pytest.skip(results["skip"])
    return results


def _result(checks: dict, name: str) -> dict:
    result = checks[name]
    assert "error" not in result, result.get("error")
    return result


@pytest.mark.parametrize("case", ["eager_uneven", "graph_uneven_loop", "graph_two_encoders",
                                  "eager_cached_loss", "graph_cached_loss"])
def test_shares_sum_to_the_one_device_gradient(checks, case) -> None:
    result = _result(checks, case)
    assert result["replicas"] == 2
    assert max(result["loss_errors"]) <= TOLERANCE      # every replica: the global-batch loss
    assert result["grad_error"] <= TOLERANCE            # sum of the shares: one device's gradient
    assert result["temperature_error"] <= TOLERANCE     # a loss-owned variable, counted once
    assert result["shares_differ"]                      # each replica pulled back its own rows


def test_optimizer_in_strategy_run_applies_the_global_batch_gradient(checks) -> None:
    result = _result(checks, "optimizer")
    assert result["variable_error"] <= TOLERANCE
    assert max(result["loss_errors"]) <= TOLERANCE


def test_fit_under_strategy_scope_matches_one_device(checks) -> None:
    result = _result(checks, "fit")
    assert result["replicas"] == 2
    assert result["variable_error"] <= TOLERANCE
    assert result["loss_error"] <= 1e-8


def test_default_inside_strategy_run_is_per_replica(checks) -> None:
    result = _result(checks, "per_replica_default")
    assert result["loss_errors"] <= TOLERANCE   # each replica: the loss of its own rows


def test_errors(checks) -> None:
    result = _result(checks, "errors")
    assert "cross-replica context" in result["cross_replica"]
    assert result["cross_replica_type"] == "GradCacheError"
    assert result["bad_flag_type"] == "GradCacheError"
    assert result["fit_kwargs_type"] == "GradCacheError"
    for mode in ("eager", "graph"):   # a replica that raises stops the step, nobody waits
        assert result[f"raising_{mode}"].startswith("ValueError")
        assert "replica 1 broke" in result[f"raising_{mode}"]
        assert result[f"raising_{mode}_seconds"] < 30


def test_docs_example_with_two_replicas(checks) -> None:
    result = _result(checks, "docs")
    assert result["printed"] == "2 True"


# -- the subprocess ---------------------------------------------------------------------------------

def _main() -> None:  # one script: every check shares one TensorFlow start-up
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

    import keras
    import numpy as np

    from gradcache.testing.contract import relative_error
    from gradcache_tf import GradCacheModel, cached_loss, cached_step

    if keras.backend.backend() != "tensorflow":
        print(json.dumps({"skip": f"Keras runs on {keras.backend.backend()}"}))
        return
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    rng = np.random.default_rng(0)
    dim = 6

    class Temperature(tf.Module):
        def __init__(self):
            super().__init__()
            self.log_scale = tf.Variable(tf.constant(0.4, tf.float64))

        def __call__(self, q, p):
            scores = tf.exp(self.log_scale) * tf.matmul(q, p, transpose_b=True)
            labels = tf.range(tf.shape(q)[0])
            return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, scores))

    def tower(seed: int):
        init = keras.initializers.GlorotNormal(seed=seed)
        return keras.Sequential([keras.Input((dim,), dtype="float64"),
                                 keras.layers.Dense(8, activation="tanh", dtype="float64",
                                                    kernel_initializer=init),
                                 # tanh: a shared shift of every passage would not change the
                                 # loss, leaving that bias a gradient of rounding noise
                                 keras.layers.Dense(4, activation="tanh", dtype="float64",
                                                    kernel_initializer=init)])

    def split(x, counts):
        starts = np.cumsum([0, *counts])
        return strategy.experimental_distribute_values_from_function(
            lambda ctx: x[starts[ctx.replica_id_in_sync_group]:
                          starts[ctx.replica_id_in_sync_group + 1]])

    def local(value):
        return [np.asarray(v) for v in strategy.experimental_local_results(value)]

    def exactness(counts, chunk, two_encoders, compiled, through_loss=False):
        with strategy.scope():
            encoders = [tower(1), tower(2)] if two_encoders else tower(1)
            loss_fn = Temperature()
        total = sum(counts)
        q = tf.constant(rng.normal(size=(total, dim)))
        p = tf.constant(rng.normal(size=(total, dim)))
        pair = encoders if two_encoders else [encoders, encoders]
        variables = ([v for e in pair for v in e.trainable_variables] if two_encoders
                     else list(encoders.trainable_variables)) + [loss_fn.log_scale]
        with tf.GradientTape() as tape:
            want_loss = loss_fn(pair[0](q), pair[1](p))
        want = tape.gradient(want_loss, variables)

        def step(a, b):
            if not through_loss:
                return cached_step(encoders, (a, b), loss_fn, chunk_size=chunk,
                                   variables=variables, distributed=True)
            with tf.GradientTape() as tape:   # cached_loss: the tape's gradient, the same shares
                loss = cached_loss(encoders, (a, b), loss_fn, chunk_size=chunk,
                                   variables=variables, distributed=True)
            return loss, tape.gradient(loss, variables)

        def run(a, b):
            return strategy.run(step, args=(a, b))

        loss, grads = (tf.function(run) if compiled else run)(split(q, counts), split(p, counts))
        shares = [local(g) for g in grads]
        errors = [relative_error(sum(s), w.numpy()) for s, w in zip(shares, want)]
        return {"replicas": strategy.num_replicas_in_sync,
                "loss_errors": [relative_error(v, want_loss.numpy()) for v in local(loss)],
                "grad_error": max(errors[:-1]), "temperature_error": errors[-1],
                "shares_differ": bool(all(np.max(np.abs(s[0] - s[1])) > 0 for s in shares[:-1]))}

    def optimizer_check():
        counts, steps = [6, 6], 2
        with strategy.scope():
            encoder, loss_fn = tower(3), Temperature()
            optimizer = keras.optimizers.SGD(0.5)
            optimizer.build(list(encoder.trainable_variables) + [loss_fn.log_scale])
        single, single_loss = tower(3), Temperature()
        reference = keras.optimizers.SGD(0.5)
        variables = list(encoder.trainable_variables) + [loss_fn.log_scale]
        single_vars = list(single.trainable_variables) + [single_loss.log_scale]

        @tf.function
        def train(a, b):
            def step(a, b):
                loss, grads = cached_step(encoder, (a, b), loss_fn, chunk_size=2,
                                          variables=variables, distributed=True)
                optimizer.apply_gradients(zip(grads, variables))
                return loss
            return strategy.run(step, args=(a, b))

        loss_errors = []
        for _ in range(steps):
            q = tf.constant(rng.normal(size=(sum(counts), dim)))
            p = tf.constant(rng.normal(size=(sum(counts), dim)))
            losses = local(train(split(q, counts), split(p, counts)))
            with tf.GradientTape() as tape:
                want_loss = single_loss(single(q), single(p))
            reference.apply_gradients(zip(tape.gradient(want_loss, single_vars), single_vars))
            loss_errors += [relative_error(v, want_loss.numpy()) for v in losses]
        return {"loss_errors": loss_errors,
                "variable_error": max(relative_error(np.asarray(a), np.asarray(b))
                                      for a, b in zip(variables, single_vars))}

    def fit_check():
        pairs = rng.normal(size=(2, 32, dim))
        data = tf.data.Dataset.from_tensor_slices((pairs[0], pairs[1])).batch(
            16, drop_remainder=True)
        histories, weights = [], []
        for distributed in (True, False):
            keras.utils.set_random_seed(7)
            context = strategy.scope() if distributed else tf.distribute.get_strategy().scope()
            with context:
                model = GradCacheModel(tower(5), Temperature(), chunk_size=3)
                model.compile(optimizer=keras.optimizers.SGD(0.5))
            history = model.fit(data, epochs=2, verbose=0, shuffle=False)
            histories.append(history.history["loss"])
            weights.append([np.asarray(v) for v in model.encoders.trainable_variables]
                           + [np.asarray(model.contrastive_loss.log_scale)])
            if distributed:
                replicas = model.distribute_strategy.num_replicas_in_sync
        return {"replicas": replicas,
                "variable_error": max(relative_error(a, b) for a, b in zip(*weights)),
                "loss_error": relative_error(histories[0], histories[1])}

    def per_replica_default():
        encoder, loss_fn = tower(4), Temperature()
        q, p = tf.constant(rng.normal(size=(8, dim))), tf.constant(rng.normal(size=(8, dim)))
        loss, _ = strategy.run(lambda a, b: cached_step(encoder, (a, b), loss_fn, chunk_size=2),
                               args=(split(q, [4, 4]), split(p, [4, 4])))
        want = [loss_fn(encoder(q[:4]), encoder(p[:4])), loss_fn(encoder(q[4:]), encoder(p[4:]))]
        return {"loss_errors": max(relative_error(v, w.numpy())
                                   for v, w in zip(local(loss), want))}

    def errors():
        out = {}
        encoder, loss_fn = tower(6), Temperature()
        q = tf.constant(rng.normal(size=(4, dim)))
        with strategy.scope():
            try:
                cached_step(encoder, (q, q), loss_fn, chunk_size=2, distributed=True)
            except Exception as error:  # noqa: BLE001
                out["cross_replica"], out["cross_replica_type"] = str(error), type(error).__name__
        try:
            cached_step(encoder, (q, q), loss_fn, chunk_size=2, distributed="yes")
        except Exception as error:  # noqa: BLE001
            out["bad_flag_type"] = type(error).__name__

        def breaks_on_replica_one(x):
            ctx = tf.distribute.get_replica_context()
            if tf.get_static_value(ctx.replica_id_in_sync_group) == 1:
                raise ValueError("replica 1 broke")
            return x @ encoder.trainable_variables[0]

        def step(a, b):
            return cached_step(breaks_on_replica_one, (a, b), loss_fn, chunk_size=2,
                               variables=encoder.trainable_variables, distributed=True)

        for mode in ("eager", "graph"):
            def run(a, b):
                return strategy.run(step, args=(a, b))
            start = time.monotonic()
            try:
                (tf.function(run) if mode == "graph" else run)(split(q, [2, 2]), split(q, [2, 2]))
                out[f"raising_{mode}"] = "no error"
            except Exception as error:  # noqa: BLE001
                out[f"raising_{mode}"] = f"{type(error).__name__}: {error}"
            out[f"raising_{mode}_seconds"] = time.monotonic() - start

        with strategy.scope():
            model = GradCacheModel(tower(6), Temperature(), chunk_size=2)
            model.compile(optimizer="sgd")
        data = tf.data.Dataset.from_tensor_slices(
            {"groups": (np.ones((8, dim)), np.ones((8, dim))), "weight": np.ones((8,))}).batch(4)
        try:
            model.fit(data, epochs=1, verbose=0)
            out["fit_kwargs_type"] = "no error"
        except Exception as error:  # noqa: BLE001
            out["fit_kwargs_type"] = type(error).__name__
        return out

    def docs_check():
        import contextlib
        import io
        import re
        text = (ROOT / "docs" / "tf.md").read_text()
        blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
        block = next(b for b in blocks if "distributed=True" in b)
        # the strategy of the other checks (two CPU replicas): Keras' global SeedGenerator, which
        # the step snapshots, belongs to the strategy it was created under
        block = block.replace("tf.distribute.MirroredStrategy()", "two_replicas")
        namespace: dict = {"np": np, "two_replicas": strategy}
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(compile(blocks[0], "tf.md", "exec"), namespace)  # noqa: S102 - our own docs
            exec(compile(block, "tf.md", "exec"), namespace)  # noqa: S102
        return {"printed": printed.getvalue().strip().splitlines()[-1]}

    checks = {
        "eager_uneven": lambda: exactness([5, 3], 2, two_encoders=False, compiled=False),
        "graph_uneven_loop": lambda: exactness([9, 6], 2, two_encoders=False, compiled=True),
        "graph_two_encoders": lambda: exactness([4, 4], 3, two_encoders=True, compiled=True),
        "eager_cached_loss": lambda: exactness([5, 3], 2, two_encoders=False, compiled=False,
                                               through_loss=True),
        "graph_cached_loss": lambda: exactness([9, 6], 2, two_encoders=True, compiled=True,
                                               through_loss=True),
        "optimizer": optimizer_check,
        "fit": fit_check,
        "per_replica_default": per_replica_default,
        "errors": errors,
        "docs": docs_check,
    }
    results = {}
    for name, check in checks.items():
        start = time.monotonic()
        try:
            results[name] = check()
        except Exception:  # noqa: BLE001 - reported to the test that reads it
            results[name] = {"error": traceback.format_exc()[-3000:]}
        results[name]["seconds"] = time.monotonic() - start
    print(json.dumps(results))


if __name__ == "__main__":
    _main()
