"""The GPU check (issue 14): what CPU-only CI cannot measure, in one run on one CUDA GPU.

Sections, in order, each inside its own ``try`` so that one failing loses none of the others; each
prints its figures and appends them to ONE markdown results file as soon as it has them (a run cut
short still leaves every finished section there):

1. **CUDA tests**: ``pytest -m cuda`` -- the CUDA random-state replay tests (tests/torch/test_cuda.py)
   and the documentation's GPU blocks.
2. **Mixed precision**: ``cached_step`` under bf16 autocast, and under fp16 autocast with a
   ``torch.amp.GradScaler``, against the full-batch step under the same autocast (and both against
   float32), on a BERT-shaped encoder: max relative gradient errors.
3. **Memory curve**: a BERT-base-size encoder (``transformers.BertConfig``, random weights: the
   machine has no network), peak ``torch.cuda.max_memory_allocated`` of a cached step (chunk 32)
   and of a full-batch step as the batch doubles, until the full step runs out of memory; the
   cached step goes on a few sizes further.
4. **Step time**: cached / plain step time of that encoder at chunk 32, 64, 128, 256 (synchronised,
   one warm-up, median of interleaved repetitions).
5. **Tiled InfoNCE headline**: ``bench_losses.py``'s headline, one cached step with the tiled
   InfoNCE at B = 1,048,576 (after a warm-up size).
6. **JAX**: the tiled loss's jitted value-and-grad at B = 262,144 (compiled memory and the device's
   peak), then ``gradcache_jax.cached_step`` under ``jit`` against the full-batch gradient: max
   relative error, step times, compiled temporary memory.

``--smoke`` runs every section's CPU-able part at tiny sizes on the CPU, through the same functions
(``device="cpu"``), and writes "skipped: no CUDA" for what needs a GPU: that is what
tests/bench/test_gpu_check.py runs, so the code the GPU runs is the code CI ran. Sizes are chosen
for about 6-8 minutes on one H200; each section also stops growing when its time budget is spent.

    bash benchmarks/gpu_check.sh                                  # the GPU run (OUT=dir)
    python benchmarks/gpu_check.py --out results/gpu_check.md     # the same, without the wrapper
    python benchmarks/gpu_check.py --smoke --out /tmp/gpu_check.md
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import importlib.metadata
import io
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

SECTIONS = ("CUDA tests", "Mixed precision", "Memory curve", "Step time",
            "Tiled InfoNCE headline", "JAX")
NO_CUDA = "skipped: no CUDA"
FP16_SCALES = (2.0**16, 2.0**12, 2.0**8, 2.0**4, 1.0)  # GradScaler starts at 2**16

BERT_BASE = {"vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12,
             "num_attention_heads": 12, "intermediate_size": 3072}
BERT_TINY = {"vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 1,
             "num_attention_heads": 2, "intermediate_size": 64}


@dataclass(frozen=True)
class Sizes:
    """Every size and time budget of one run (the GPU's, or the CPU smoke run's)."""

    bert: dict
    seq: int
    precision_rows: int
    precision_chunk: int
    memory_chunk: int
    memory_start: int
    memory_further: int          # cached sizes past the full step's last one
    memory_full_cap: int | None  # largest full-batch size tried (None: until it runs out)
    memory_cap: int
    speed_rows: int
    speed_chunks: tuple[int, ...]
    repeats: int
    headline_rows: tuple[int, ...]
    headline_chunk: int
    jax_model: dict
    jax_rows: int
    jax_chunk: int
    jax_loss_rows: int
    budgets: dict = field(default_factory=dict)  # seconds a growing section may spend


GPU = Sizes(bert=BERT_BASE, seq=128, precision_rows=64, precision_chunk=16,
            memory_chunk=32, memory_start=64, memory_further=2, memory_full_cap=None,
            memory_cap=1 << 16, speed_rows=256, speed_chunks=(32, 64, 128, 256), repeats=3,
            headline_rows=(131_072, 1_048_576), headline_chunk=65_536,
            jax_model={"dim_in": 512, "hidden": 2048, "dim_out": 256, "layers": 4},
            jax_rows=8192, jax_chunk=512, jax_loss_rows=262_144,
            budgets={"tests": 120, "memory": 180})
SMOKE = Sizes(bert=BERT_TINY, seq=8, precision_rows=8, precision_chunk=4,
              memory_chunk=4, memory_start=4, memory_further=0, memory_full_cap=4,
              memory_cap=64, speed_rows=8, speed_chunks=(4, 8), repeats=1,
              headline_rows=(1024,), headline_chunk=256,
              jax_model={"dim_in": 8, "hidden": 16, "dim_out": 8, "layers": 1},
              jax_rows=16, jax_chunk=8, jax_loss_rows=512,
              budgets={"tests": 60, "memory": 30})


# -- the results file --------------------------------------------------------------------------------
class Results:
    """One markdown file, appended to and flushed line by line (a killed run keeps what it wrote)."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")

    def write(self, text: str = "") -> None:
        print(text, flush=True)
        with self.path.open("a") as out:
            out.write(text + "\n")

    @contextlib.contextmanager
    def section(self, number: int, name: str) -> Iterator[None]:
        """A heading, then the section; an error is written (with its traceback's tail) and
        swallowed, so the next section runs."""
        self.write(f"## {number}. {name}\n")
        start = time.perf_counter()
        try:
            yield
        except Exception as error:  # noqa: BLE001 - one section's failure must not end the run
            lines = traceback.format_exc().strip().splitlines()
            self.write(f"**error**: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}\n")
            self.write("```\n" + "\n".join(lines[-25:]) + "\n```")
        finally:
            self.write(f"\n({time.perf_counter() - start:.0f} s)\n")

    def table(self, header: list[str], rows: list[list[Any]]) -> None:
        self.write("| " + " | ".join(header) + " |")
        self.write("|" + "---|" * len(header))
        for row in rows:
            self.write("| " + " | ".join(str(cell) for cell in row) + " |")
        self.write()


def mib(size: float | None) -> str:
    return "-" if size is None else f"{size / 2**20:,.0f}"


# -- devices: one interface for CUDA and the CPU, so the smoke run runs the GPU's code ----------------
class Device:
    """Synchronising, peak memory and out-of-memory on one torch device."""

    def __init__(self, name: str):
        import torch

        self.name = name
        self.cuda = name.startswith("cuda")
        self.type = "cuda" if self.cuda else "cpu"
        self.oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)

    def out_of_memory(self, error: BaseException) -> bool:
        """Whether ``error`` says the device ran out (cuBLAS and cuDNN report a failed allocation
        of their workspaces as a RuntimeError, not as torch's OutOfMemoryError)."""
        from gradcache_cli import memory

        return isinstance(error, self.oom) or (self.cuda and memory.mentions_memory(error))

    def sync(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()

    def start_peak(self) -> int:
        """Readies a peak measurement; returns what is held now (allocated bytes, or RSS)."""
        import torch

        from gradcache_cli import memory

        self.sync()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated()
        return memory.baseline()

    def peak_since(self, before: int) -> int:
        import torch

        from gradcache_cli import memory

        self.sync()
        peak = torch.cuda.max_memory_allocated() if self.cuda else memory.peak_rss_bytes()
        return max(0, peak - before)

    def release(self) -> None:
        """Gives back what a failed (out-of-memory) step left cached."""
        import torch

        if self.cuda:
            gc.collect()  # the failed step's tensors, held by reference cycles of its frames
            torch.cuda.empty_cache()

    def timed(self, step: Callable[[], Any]) -> float:
        self.sync()
        start = time.perf_counter()
        step()
        self.sync()
        return time.perf_counter() - start


def bert_encoder(spec: dict, device: str, dropout: float) -> Any:
    """A Hugging Face BERT built from its config (random weights: nothing is downloaded), taking
    token ids and returning the [CLS] row of its last hidden state."""
    import torch
    import transformers

    config = transformers.BertConfig(**spec, hidden_dropout_prob=dropout,
                                     attention_probs_dropout_prob=dropout)

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = transformers.BertModel(config, add_pooling_layer=False)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.bert(input_ids=ids).last_hidden_state[:, 0]

    torch.manual_seed(0)
    return Encoder().to(device).train()


def token_pair(spec: dict, rows: int, seq: int, device: str, seed: int = 0) -> tuple:
    import torch

    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randint(1, spec["vocab_size"], (rows, seq), generator=generator).to(device)
                 for _ in range(2))


def loss_fn(q: Any, p: Any) -> Any:
    from gradcache_torch.losses import info_nce

    return info_nce(q, p, temperature=0.05)


def full_step(model: Any, q: Any, p: Any, scaler: Any = None) -> Any:
    loss = loss_fn(model(q), model(p))
    (scaler.scale(loss) if scaler is not None else loss).backward()
    return loss


def gradients(model: Any, scale: float = 1.0) -> list:
    import torch

    return [(p.grad.detach().double() / scale if p.grad is not None
             else torch.zeros_like(p, dtype=torch.float64)) for p in model.parameters()]


def errors(actual: list, expected: list) -> tuple[float, float]:
    """(max over tensors of max|a - e| / max|e|, and the same over all tensors together)."""
    per_tensor, diff, scale = 0.0, 0.0, 0.0
    for a, e in zip(actual, expected):
        d, s = float((a - e).abs().max()), float(e.abs().max())
        per_tensor = max(per_tensor, d / s if s > 0 else d)
        diff, scale = max(diff, d), max(scale, s)
    return per_tensor, (diff / scale if scale > 0 else diff)


# -- 1. the CUDA tests ---------------------------------------------------------------------------------
def cuda_tests(results: Results, sizes: Sizes, device: Device) -> None:
    if not device.cuda:
        results.write(NO_CUDA)
        return
    command = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-m", "cuda",
               "tests/torch/test_cuda.py", "tests/docs/test_code_blocks.py"]
    results.write("`" + " ".join(command[1:]) + "`\n")
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                              timeout=sizes.budgets["tests"])
        output, status = done.stdout + done.stderr, str(done.returncode)
    except subprocess.TimeoutExpired as expired:  # its output is bytes even with text=True
        captured = expired.stdout or b""
        output = captured.decode(errors="replace") if isinstance(captured, bytes) else captured
        status = f"timed out after {sizes.budgets['tests']} s"
    results.write(f"exit status: {status}\n")
    results.write("```\n" + "\n".join(output.strip().splitlines()[-40:]) + "\n```")


# -- 2. mixed precision ---------------------------------------------------------------------------------
def mixed_precision(results: Results, sizes: Sizes, device: Device) -> None:
    import torch

    from gradcache_torch import cached_step

    model = bert_encoder(sizes.bert, device.name, dropout=0.0)  # no dropout: precision alone
    q, p = token_pair(sizes.bert, sizes.precision_rows, sizes.seq, device.name)
    model.zero_grad(set_to_none=True)
    full_step(model, q, p)
    reference = gradients(model)  # float32, full batch

    def both(dtype: Any, scale: float | None) -> dict:
        found = {}
        for form in ("cached", "full"):
            model.zero_grad(set_to_none=True)
            scaler = torch.amp.GradScaler(device.type, init_scale=scale) if scale else None
            with torch.autocast(device.type, dtype=dtype):
                if form == "cached":
                    cached_step(model, (q, p), loss_fn, chunk_size=sizes.precision_chunk,
                                scaler=scaler)
                else:
                    full_step(model, q, p, scaler)
            found[form] = gradients(model, scale or 1.0)
        return found

    def finite(found: dict) -> dict:
        return {form: all(bool(g.isfinite().all()) for g in grads) for form, grads in found.items()}

    rows = []
    for label, dtype, scales in (("bf16 autocast", torch.bfloat16, [None]),
                                 ("fp16 autocast + GradScaler", torch.float16, FP16_SCALES)):
        overflowed = []
        for scale in scales:  # as GradScaler would after an overflow: a smaller scale, again
            found = both(dtype, scale)
            ok = finite(found)
            if all(ok.values()):
                break
            overflowed.append(f"{scale:g}: " + ", ".join(f for f in ok if not ok[f]))
        tensor_error, global_error = errors(found["cached"], found["full"])
        rows.append([label, "-" if scale is None else f"{scale:g}", f"{tensor_error:.2e}",
                     f"{global_error:.2e}", f"{errors(found['full'], reference)[1]:.2e}",
                     f"{errors(found['cached'], reference)[1]:.2e}",
                     "; ".join(overflowed) or "none"])
    results.write(f"encoder: BERT {sizes.bert['num_hidden_layers']} layers x "
                  f"{sizes.bert['hidden_size']}, random weights, no dropout; batch "
                  f"{sizes.precision_rows} x 2 groups, seq {sizes.seq}, chunk "
                  f"{sizes.precision_chunk}; tiled InfoNCE; gradients unscaled (/ GradScaler's "
                  f"scale) before comparing. Error = max|a - b| / max|b|.\n")
    results.table(["autocast", "loss scale", "cached vs full: max per tensor",
                   "cached vs full: all", "full vs float32", "cached vs float32",
                   "non-finite gradients at larger scales (scale: step)"], rows)
    results.write("cached vs full should be no larger than the rounding of the autocast itself "
                  "(full vs float32).")


# -- 3. the memory curve ---------------------------------------------------------------------------------
def memory_curve(results: Results, sizes: Sizes, device: Device) -> None:
    from gradcache_torch import cached_step

    model = bert_encoder(sizes.bert, device.name, dropout=0.1)
    parameters = sum(p.numel() for p in model.parameters())
    chunk = sizes.memory_chunk

    def step(mode: str, rows: int) -> tuple[int, float] | None:
        """(peak growth, seconds) of one step at ``rows`` per group; None if it ran out of memory."""
        inputs = token_pair(sizes.bert, rows, sizes.seq, device.name, seed=rows)
        model.zero_grad(set_to_none=True)
        run = (functools.partial(cached_step, model, inputs, loss_fn, chunk_size=chunk)
               if mode == "cached" else functools.partial(full_step, model, *inputs))
        try:
            before = device.start_peak()
            seconds = device.timed(run)
            return device.peak_since(before), seconds
        except Exception as error:
            if device.out_of_memory(error):
                return None
            raise
        finally:
            model.zero_grad(set_to_none=True)

    step("cached", chunk)  # warm-up: kernels, workspaces, the allocator's first blocks
    step("full", chunk)
    device.release()
    results.write(f"encoder: BERT {sizes.bert['num_hidden_layers']} layers x "
                  f"{sizes.bert['hidden_size']} ({parameters / 1e6:.1f} M parameters, random "
                  f"weights, dropout 0.1), seq {sizes.seq}, float32, tiled InfoNCE, cached chunk "
                  f"{chunk}; peak {'allocated' if device.cuda else 'RSS'} growth over the "
                  f"inputs and model (includes the {mib(4 * parameters)} MiB of gradients).\n")
    rows, table = sizes.memory_start, []
    full_on, further, last_seconds = True, sizes.memory_further, 0.0
    deadline = time.perf_counter() + sizes.budgets["memory"]
    stop = "size cap"
    while rows <= sizes.memory_cap:
        if time.perf_counter() + 2.5 * last_seconds > deadline:
            stop = f"time budget ({sizes.budgets['memory']} s)"
            break
        full_cell, full = "-", None
        if full_on and sizes.memory_full_cap is not None and rows > sizes.memory_full_cap:
            full_on, full_cell = False, "not run (smoke cap)"
        elif full_on:
            full = step("full", rows)
            device.release()
            full_on = full is not None
            full_cell = mib(full[0]) if full else "out of memory"
        cached = step("cached", rows)
        device.release()
        table.append([rows, 2 * rows, full_cell, mib(cached[0]) if cached else "out of memory",
                      f"{full[1]:.2f}" if full else "-", f"{cached[1]:.2f}" if cached else "-",
                      f"{full[0] / cached[0]:.1f}" if full and cached and cached[0] else "-"])
        print("progress:", table[-1], flush=True)  # the log shows the curve as it grows
        if cached is None:
            stop = "the cached step ran out of memory"
            break
        last_seconds = cached[1] + (full[1] if full else 0.0)
        if not full_on:
            further -= 1
            if further < 0:
                stop = (f"the cached step went {sizes.memory_further} size(s) past the one where "
                        f"the full step {'was last run' if sizes.memory_full_cap else 'ran out'}")
                break
        rows *= 2
    results.table(["batch / group", "sequences", "full peak (MiB)", "cached peak (MiB)",
                   "full (s)", "cached (s)", "full / cached"], table)
    results.write(f"stopped: {stop}.")


# -- 4. step time -----------------------------------------------------------------------------------------
def step_time(results: Results, sizes: Sizes, device: Device) -> None:
    from gradcache_torch import cached_step

    model = bert_encoder(sizes.bert, device.name, dropout=0.1)
    q, p = token_pair(sizes.bert, sizes.speed_rows, sizes.seq, device.name)
    table = []
    for chunk in sizes.speed_chunks:
        steps = {"cached": functools.partial(cached_step, model, (q, p), loss_fn, chunk_size=chunk),
                 "plain": functools.partial(full_step, model, q, p)}
        for run in steps.values():  # warm-up
            model.zero_grad(set_to_none=True)
            device.timed(run)
        times: dict[str, list[float]] = {name: [] for name in steps}
        for _ in range(sizes.repeats):
            for name, run in steps.items():  # interleaved: drift hits both alike
                model.zero_grad(set_to_none=True)
                times[name].append(device.timed(run))
        cached, plain = (statistics.median(times[name]) for name in ("cached", "plain"))
        table.append([chunk, sizes.speed_rows // chunk, f"{1e3 * cached:.0f}",
                      f"{1e3 * plain:.0f}", f"{cached / plain:.2f}"])
    results.write(f"encoder: BERT {sizes.bert['num_hidden_layers']} layers x "
                  f"{sizes.bert['hidden_size']}, dropout 0.1, float32; batch {sizes.speed_rows} x 2 "
                  f"groups, seq {sizes.seq}; tiled InfoNCE; median of {sizes.repeats} after a "
                  f"warm-up, interleaved, synchronised.\n")
    results.table(["chunk", "chunks / group", "cached (ms)", "plain (ms)", "cached / plain"], table)
    results.write("A cached step runs every chunk forward twice and backward once: about 4/3 of a "
                  "plain step's work, plus whatever small chunks lose in GPU utilisation.")


# -- 5. the tiled InfoNCE headline -----------------------------------------------------------------------
def headline(results: Results, sizes: Sizes, device: Device) -> None:
    import bench_losses  # benchmarks/: the headline is that script's, run here as it is

    for rows in sizes.headline_rows:
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            bench_losses.headline(rows, sizes.headline_chunk, None, device.name)
        results.write(printed.getvalue().replace("## Headline", "### Headline").rstrip() + "\n")


# -- 6. JAX ------------------------------------------------------------------------------------------------
def jax_section(results: Results, sizes: Sizes, device: Device) -> None:
    import jax

    where = jax.devices()[0]
    results.write(f"JAX {jax.__version__} on {where.platform} ({where.device_kind})\n")
    if device.cuda and where.platform == "cpu":
        results.write("skipped: JAX sees no GPU")
        return
    for part in (jax_tiled_loss, jax_cached_step):  # the loss first: the device's peak is global
        try:
            part(results, sizes)
        except Exception as error:  # noqa: BLE001 - the other part still runs
            results.write(f"**error** in {part.__name__}: {type(error).__name__}: {error}\n")
            results.write("```\n" + "\n".join(traceback.format_exc().strip().splitlines()[-15:])
                          + "\n```")


def jax_tiled_loss(results: Results, sizes: Sizes) -> None:
    import jax
    import jax.numpy as jnp

    from gradcache_jax.losses import info_nce

    rows, dim = sizes.jax_loss_rows, 128
    grad = jax.jit(jax.value_and_grad(lambda x, y: info_nce(x, y, temperature=0.05),
                                      argnums=(0, 1)))
    shape = jax.ShapeDtypeStruct((rows, dim), jnp.float32)
    start = time.perf_counter()
    compiled = grad.lower(shape, shape).compile()
    compile_seconds = time.perf_counter() - start
    stats = compiled.memory_analysis()
    assert stats is not None, "this JAX gives no memory analysis"
    program = (stats.argument_size_in_bytes + stats.output_size_in_bytes
               + stats.temp_size_in_bytes - stats.alias_size_in_bytes)
    kx, ky = jax.random.split(jax.random.PRNGKey(0))
    x = jax.random.normal(kx, (rows, dim), jnp.float32)
    y = jax.random.normal(ky, (rows, dim), jnp.float32)
    jax.block_until_ready(compiled(x, y))  # warm-up
    start = time.perf_counter()
    loss, (gx, gy) = jax.block_until_ready(compiled(x, y))
    seconds = time.perf_counter() - start
    device_stats = jax.devices()[0].memory_stats() or {}
    peak = device_stats.get("peak_bytes_in_use")
    floor = 4 * rows * dim * 4  # two (B, d) inputs and their gradients, float32
    results.write(f"### Tiled InfoNCE value_and_grad, B = {rows:,}, d = {dim}, float32, jitted\n")
    results.table(["loss", "time (s)", "compile (s)", "compiled memory (MiB)",
                   "device peak in use (MiB)", "inputs + grads (MiB)", "compiled / floor",
                   "one dense B x B float32 (MiB)"],
                  [[f"{float(loss):.4f}", f"{seconds:.2f}", f"{compile_seconds:.1f}", mib(program),
                    mib(peak), mib(floor), f"{program / floor:.2f}", mib(rows * rows * 4)]])
    assert bool(jnp.isfinite(gx).all() & jnp.isfinite(gy).all()), "non-finite gradients"


def jax_cached_step(results: Results, sizes: Sizes) -> None:
    import bench_jax  # benchmarks/: its residual MLP tower and its jitted cached and full steps
    import jax
    import numpy as np

    rows, chunk, model = sizes.jax_rows, sizes.jax_chunk, sizes.jax_model
    params = bench_jax.mlp_params(**model)
    q, d = bench_jax.data(rows, model["dim_in"])
    # "highest": float32 products in float32 (GPU default: TF32), so the comparison is of the
    # cached step's arithmetic, not of the matmul unit's rounding
    precision = getattr(jax, "default_matmul_precision", None)
    with precision("highest") if precision is not None else contextlib.nullcontext():
        steps = bench_jax.make_steps(chunk)
        compiled, temp = {}, {}
        for name, step in steps.items():
            compiled[name] = step.lower(params, q, d).compile()
            temp[name] = compiled[name].memory_analysis().temp_size_in_bytes
        answers = {name: jax.block_until_ready(run(params, q, d)) for name, run in compiled.items()}
        times: dict[str, list[float]] = {name: [] for name in compiled}
        for _ in range(sizes.repeats):
            for name, run in compiled.items():
                start = time.perf_counter()
                jax.block_until_ready(run(params, q, d))
                times[name].append(time.perf_counter() - start)
    cached_leaves = jax.tree_util.tree_leaves(answers["cached"][1])
    full_leaves = jax.tree_util.tree_leaves(answers["full"][1])
    per_leaf = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                   / max(float(np.max(np.abs(np.asarray(b)))), 1e-30)
                   for a, b in zip(cached_leaves, full_leaves))
    med = {name: statistics.median(values) for name, values in times.items()}
    results.write(f"### cached_step under jit vs the full-batch gradient (residual MLP "
                  f"{model['dim_in']} -> {model['hidden']} x {model['layers']} -> "
                  f"{model['dim_out']}, batch {rows} x 2 groups, chunk {chunk}, dense InfoNCE, "
                  f"matmul precision {'default' if precision is None else 'highest'}; median of "
                  f"{sizes.repeats})\n")
    results.table(["loss (cached / full)", "max rel. gradient error", "cached (ms)", "full (ms)",
                   "cached / full", "cached temp (MiB)", "full temp (MiB)"],
                  [[f"{float(answers['cached'][0]):.5f} / {float(answers['full'][0]):.5f}",
                    f"{per_leaf:.2e}", f"{1e3 * med['cached']:.1f}", f"{1e3 * med['full']:.1f}",
                    f"{med['cached'] / med['full']:.2f}", mib(temp["cached"]),
                    mib(temp["full"])]])


# -- the run ------------------------------------------------------------------------------------------------
def machine(device: Device, smoke: bool) -> str:
    import torch

    gpu = torch.cuda.get_device_name() if device.cuda else "none used"
    found = [f"torch {torch.__version__}"]
    for name in ("jax", "jaxlib", "transformers"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found.append(f"{name} {importlib.metadata.version(name)}")
    return (f"{'smoke run (CPU, tiny sizes)' if smoke else 'full run'}; GPU: {gpu}; "
            f"Python {platform.python_version()}; {', '.join(found)}; "
            f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="the results file (default: $OUT/gpu_check.md, $OUT defaulting to "
                             "benchmarks/results)")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU, tiny sizes: every section's CPU-able part (what CI runs)")
    parser.add_argument("--only", default=None,
                        help="comma-separated section numbers to run (default: all)")
    args = parser.parse_args(argv)
    for path in (str(ROOT), str(HERE)):  # the library, and the sibling benchmarks reused here
        if path not in sys.path:
            sys.path.insert(0, path)
    # JAX would take 75% of the GPU at its first use, out from under torch's allocator; on
    # demand, it shares the device with the torch sections run before it
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA device: run with --smoke for the CPU parts", file=sys.stderr)
        return 2
    out = args.out or Path(os.environ.get("OUT") or ROOT / "benchmarks" / "results") / "gpu_check.md"
    results = Results(out)
    device = Device("cpu" if args.smoke else "cuda")
    if args.smoke:  # two threads on a shared CPU stall on each other at every small operation
        torch.set_num_threads(1)
    sizes = SMOKE if args.smoke else GPU
    only = {int(n) for n in args.only.split(",")} if args.only else None
    results.write("# GPU check\n")
    results.write(machine(device, args.smoke) + "\n")
    sections = (cuda_tests, mixed_precision, memory_curve, step_time, headline, jax_section)
    for number, (name, run) in enumerate(zip(SECTIONS, sections), start=1):
        if only and number not in only:
            continue
        with results.section(number, name):
            run(results, sizes, device)
        device.release()
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
