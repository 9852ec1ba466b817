"""Measures the TensorFlow adapter on CPU: step time and peak memory of a cached step.

Time: a cached step and a full-batch ``GradientTape`` step, both inside ``tf.function``, traced
once, then timed alternately in the same process (these machines are shared and noisy, so only a
ratio measured side by side means anything). Memory: a cached step at batch = chunk and at batch =
32 x chunk (and a full-batch step at both, for contrast), each in a fresh subprocess, reporting the
peak that TensorFlow's CPU allocator held during the step; the cached step should grow only by the
representations (and their gradients) and the loss's own memory, not by activations. It prints tables and asserts nothing.

``--cached-loss``: instead, ``cached_loss`` + ``tape.gradient`` against ``cached_step`` on the same
batch, interleaved, eagerly and inside ``tf.function`` (the same two halves of the core run in both;
the ratio should stay within 1.03).

Run: ``python benchmarks/bench_tf.py`` (``--quick`` for a smaller, faster run).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Time: (label, encoder kind and size, batch, chunk). The text encoder is the realistic case (its
# activations dwarf its weights); the wide MLP is the worst case: every chunk writes and accumulates
# a weight gradient as large as the model, so per-chunk cost grows with the number of chunks.
TIME_RUNS = {
    "full": [("text encoder, 4 chunks/group", dict(kind="text", batch=256, chunk=64)),
             ("text encoder, 8 chunks/group", dict(kind="text", batch=256, chunk=32)),
             ("text encoder, no dropout, 8 chunks", dict(kind="text", batch=256, chunk=32, dropout=0.0)),
             ("wide MLP (worst case), 8 chunks", dict(kind="mlp", batch=1024, chunk=128))],
    "quick": [("text encoder, 4 chunks/group", dict(kind="text", batch=128, chunk=32, blocks=1)),
              ("wide MLP (worst case), 8 chunks", dict(kind="mlp", batch=512, chunk=64, hidden=512))],
}
# Memory: an MLP whose activations per chunk are large next to its inputs and representations.
MEMORY = {"full": dict(kind="mlp", dim_in=32, hidden=2048, layers=3, dim_out=64, chunk=64),
          "quick": dict(kind="mlp", dim_in=32, hidden=1024, layers=2, dim_out=64, chunk=32)}


def build(kind: str = "mlp", dim_in: int = 64, hidden: int = 1024, layers: int = 3,
          dim_out: int = 128, dropout: float = 0.1, blocks: int = 2, seq: int = 32,
          vocab: int = 2000, **_: object):
    """A Keras encoder: ``"text"`` (embedding, transformer blocks, mean pooling) or ``"mlp"``."""
    import keras
    if kind == "text":
        width = dim_out
        ids = keras.Input((seq,), dtype="int32")
        x = keras.layers.Embedding(vocab, width)(ids)
        for _ in range(blocks):
            attended = keras.layers.MultiHeadAttention(4, width // 4, dropout=dropout)(x, x)
            x = keras.layers.LayerNormalization()(x + keras.layers.Dropout(dropout)(attended))
            ff = keras.layers.Dense(4 * width, activation="gelu")(x)
            ff = keras.layers.Dense(width)(ff)
            x = keras.layers.LayerNormalization()(x + keras.layers.Dropout(dropout)(ff))
        pooled = keras.layers.GlobalAveragePooling1D()(x)
        return keras.Model(ids, keras.layers.Dense(dim_out)(pooled))
    stack = [keras.Input((dim_in,))]
    for index in range(layers):
        stack.append(keras.layers.Dense(hidden, activation="gelu"))
        stack.append(keras.layers.Dropout(dropout, seed=index))
    stack.append(keras.layers.Dense(dim_out))
    return keras.Sequential(stack)


def describe(config: dict) -> str:
    if config.get("kind") == "text":
        return (f"embedding + {config.get('blocks', 2)} transformer blocks, seq 32, width "
                f"{config.get('dim_out', 128)}, dropout {config.get('dropout', 0.1)}")
    return (f"MLP {config.get('dim_in', 64)}-{config.get('hidden', 1024)}x"
            f"{config.get('layers', 3)}-{config.get('dim_out', 128)}, dropout "
            f"{config.get('dropout', 0.1)}")


def info_nce(q, p):
    import tensorflow as tf
    q = tf.math.l2_normalize(q, axis=1)
    p = tf.math.l2_normalize(p, axis=1)
    scores = 20.0 * tf.matmul(q, p, transpose_b=True)
    labels = tf.range(tf.shape(q)[0])
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, scores))


def steps(encoder, chunk: int):
    """The two steps compared: both ``(q, p) -> (loss, grads)`` inside ``tf.function``."""
    import tensorflow as tf

    import gradcache_tf

    @tf.function
    def cached(q, p):
        return gradcache_tf.cached_step(encoder, (q, p), info_nce, chunk_size=chunk)

    @tf.function
    def full(q, p):
        with tf.GradientTape() as tape:
            loss = info_nce(encoder(q, training=True), encoder(p, training=True))
        return loss, tape.gradient(loss, encoder.trainable_variables)

    return cached, full


def loss_steps(encoder, chunk: int, compiled: bool):
    """``cached_loss`` + ``tape.gradient`` and ``cached_step``: both ``(q, p) -> (loss, grads)``."""
    import tensorflow as tf

    import gradcache_tf

    def step(q, p):
        return gradcache_tf.cached_step(encoder, (q, p), info_nce, chunk_size=chunk)

    def with_tape(q, p):
        with tf.GradientTape() as tape:
            loss = gradcache_tf.cached_loss(encoder, (q, p), info_nce, chunk_size=chunk)
        return loss, tape.gradient(loss, encoder.trainable_variables)

    if compiled:
        return tf.function(with_tape), tf.function(step)
    return with_tape, step


def loss_table(runs: list, repeats: int) -> None:
    """cached_loss + tape.gradient over cached_step, same batch, interleaved (target <= 1.03)."""
    print(f"cached_loss + tape.gradient vs cached_step on CPU ({os.cpu_count()} cores), float32, "
          f"2 groups, median of {repeats} interleaved runs (wall clock; CPU seconds in brackets)")
    print(f"  {'configuration':<36}{'where':>12}{'step ms':>14}{'loss ms':>14}{'loss/step':>13}")
    for label, config in runs:
        encoder = build(**config)
        q, p = data(config, config["batch"])
        for compiled in (True, False):
            with_tape, step = loss_steps(encoder, config["chunk"], compiled)
            for fn in (with_tape, step):  # trace and warm up
                run_once(fn, q, p)
                run_once(fn, q, p)
            wall: dict[str, list] = {"loss": [], "step": []}
            cpu: dict[str, list] = {"loss": [], "step": []}
            for index in range(repeats):
                order = (("loss", with_tape), ("step", step))
                for name, fn in (order if index % 2 == 0 else order[::-1]):
                    start, start_cpu = time.perf_counter(), time.process_time()
                    run_once(fn, q, p)
                    wall[name].append(time.perf_counter() - start)
                    cpu[name].append(time.process_time() - start_cpu)
            w = {name: statistics.median(values) * 1e3 for name, values in wall.items()}
            c = {name: statistics.median(values) * 1e3 for name, values in cpu.items()}
            where = "tf.function" if compiled else "eager"
            print(f"  {label:<36}{where:>12}{w['step']:>7.0f} ({c['step']:>4.0f})"
                  f"{w['loss']:>7.0f} ({c['loss']:>4.0f}){w['loss'] / w['step']:>7.3f} "
                  f"({c['loss'] / c['step']:.3f})")


def data(config: dict, batch: int):
    import tensorflow as tf
    if config.get("kind") == "text":
        shape = (batch, config.get("seq", 32))
        return tuple(tf.random.stateless_uniform(shape, (seed, 2), maxval=config.get("vocab", 2000),
                                                 dtype=tf.int32) for seed in (1, 3))
    shape = (batch, config.get("dim_in", 64))
    return tuple(tf.random.stateless_normal(shape, (seed, 4)) for seed in (1, 3))


def run_once(fn, q, p) -> None:
    import tensorflow as tf
    loss, grads = fn(q, p)
    _ = [tf.convert_to_tensor(g).numpy() for g in grads]  # wait for the step to finish


def time_table(runs: list, repeats: int) -> None:
    print(f"Step time inside tf.function on CPU ({os.cpu_count()} cores), float32, 2 groups, median "
          f"of {repeats} alternating runs (wall clock; CPU seconds of the process in brackets)")
    print(f"  {'configuration':<36}{'batch':>6}{'chunk':>6}{'full ms':>14}{'cached ms':>16}"
          f"{'cached/full':>13}")
    for label, config in runs:
        encoder = build(**config)
        cached, full = steps(encoder, config["chunk"])
        q, p = data(config, config["batch"])
        for fn in (cached, full):  # trace and warm up
            run_once(fn, q, p)
            run_once(fn, q, p)
        wall: dict[str, list] = {"cached": [], "full": []}
        cpu: dict[str, list] = {"cached": [], "full": []}
        for _ in range(repeats):
            for name, fn in (("cached", cached), ("full", full)):
                start, start_cpu = time.perf_counter(), time.process_time()
                run_once(fn, q, p)
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
        w = {name: statistics.median(values) * 1e3 for name, values in wall.items()}
        c = {name: statistics.median(values) * 1e3 for name, values in cpu.items()}
        print(f"  {label:<36}{config['batch']:>6}{config['chunk']:>6}"
              f"{w['full']:>7.0f} ({c['full']:>4.0f}){w['cached']:>9.0f} ({c['cached']:>4.0f})"
              f"{w['cached'] / w['full']:>7.2f} ({c['cached'] / c['full']:.2f})")
        print(f"  {'':<4}{describe(config)}")
    print("  (one extra forward makes about 4/3 when backward costs two forwards; dropout's random "
          "draws are made twice, and each chunk adds one weight-gradient accumulation)")


def memory_child(kind: str, batch: int, shape: dict) -> None:
    """One step of ``kind`` at ``batch`` rows in this (fresh) process; prints its peak memory above
    what was held before the step: TensorFlow's CPU allocator where it keeps statistics (exact,
    like torch's allocator statistics: importing and tracing, which dwarf a step, are left out),
    else resident-memory growth (``gradcache_cli.tf_memory``)."""
    from gradcache_cli import memory, tf_memory
    encoder = build(**shape)
    cached, full = steps(encoder, shape["chunk"])
    fn = cached if kind == "cached" else full
    q, p = data(shape, batch)
    found = tf_memory.step_peak(lambda: run_once(fn, q, p), lambda: run_once(fn, q, p),
                                memory.default_budget())
    if found["bytes"] is None:
        sys.exit(f"{kind} step at batch {batch}: {found.get('note', 'no figure')}")
    print(json.dumps({"peak_mib": found["bytes"] / 2**20, "method": found["method"]}))


def memory_table(shape: dict, mode: str) -> None:
    chunk, dim_out = shape["chunk"], shape["dim_out"]
    runs = [("cached", chunk), ("cached", 32 * chunk), ("full", chunk), ("full", 32 * chunk)]
    peaks, methods = {}, set()
    for kind, batch in runs:
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", kind, str(batch),
                              "--mode", mode], capture_output=True, text=True, check=True)
        found = json.loads(out.stdout.strip().splitlines()[-1])
        peaks[(kind, batch)] = found["peak_mib"]
        methods.add(found["method"])
    mib = 1 / (1024 * 1024)
    source = ("TensorFlow CPU allocator" if methods == {"allocator"} else
              "resident memory: TensorFlow's CPU allocator keeps no statistics here")
    print(f"\nStep peak memory ({source}, above what was held before the step), each "
          f"configuration in a fresh process, inside tf.function: "
          f"{describe(shape)}, chunk {chunk}, 2 groups, float32")
    print(f"  {'step':<8}{'batch':>7}{'step peak':>10}{'growth':>8}{'reps+grads':>12}{'inputs':>8}"
          f"{'loss BxB':>10}{'est. acts':>13}")
    for kind in ("cached", "full"):
        base = peaks[(kind, chunk)]
        for batch in (chunk, 32 * chunk):
            reps = 2 * 2 * batch * dim_out * 4 * mib  # 2 groups: representations and their grads
            inputs = 2 * batch * shape["dim_in"] * 4 * mib
            scores = batch * batch * 4 * mib  # one B x B score matrix (the loss holds a few)
            rows = chunk if kind == "cached" else batch  # rows whose activations are kept at once
            acts = 2 * rows * shape["hidden"] * shape["layers"] * 4 * mib * (1 if kind == "cached" else 2)
            print(f"  {kind:<8}{batch:>7}{peaks[(kind, batch)]:>10.1f}"
                  f"{peaks[(kind, batch)] - base:>8.1f}{reps:>12.1f}{inputs:>8.1f}{scores:>10.1f}"
                  f"{acts:>13.1f}")
    print("  (MiB; growth is against batch = chunk; est. acts: a rough count of hidden-layer "
          "outputs kept for backward, both groups for the full step, one chunk for the cached one)")
    grow_cached = peaks[("cached", 32 * chunk)] - peaks[("cached", chunk)]
    grow_full = peaks[("full", 32 * chunk)] - peaks[("full", chunk)]
    print(f"  from batch {chunk} to {32 * chunk}: cached grows {grow_cached:.1f} MiB, full batch "
          f"grows {grow_full:.1f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller model and fewer repeats")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--child", nargs=2, metavar=("KIND", "BATCH"), help=argparse.SUPPRESS)
    parser.add_argument("--cached-loss", action="store_true",
                        help="only cached_loss + tape.gradient against cached_step")
    parser.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    mode = args.mode or ("quick" if args.quick else "full")
    if args.child:
        memory_child(args.child[0], int(args.child[1]), MEMORY[mode])
        return
    if args.cached_loss:
        loss_table(TIME_RUNS[mode], args.repeats or (5 if args.quick else 11))
        return
    time_table(TIME_RUNS[mode], args.repeats or (3 if args.quick else 7))
    memory_table(MEMORY[mode], mode)


if __name__ == "__main__":
    main()
