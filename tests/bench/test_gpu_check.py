"""``benchmarks/gpu_check.sh`` parses, and ``gpu_check.py --smoke`` runs every section on the CPU.

CI has no GPU, so the GPU run cannot be tested here; what can is that the wrapper is valid bash and
that every section's code -- the same functions the GPU runs, with ``device="cpu"`` and tiny
sizes -- runs to the end and writes its part of the one results file: figures, or "skipped: no
CUDA" for what needs a GPU, and no section's error. One subprocess, about 8 s on two busy cores
(the imports of torch, transformers and JAX are most of it).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
NEEDS = ("torch", "transformers", "jax", "gradcache_torch", "gradcache_jax")


def test_the_wrapper_is_valid_bash() -> None:
    done = subprocess.run(["bash", "-n", str(BENCHMARKS / "gpu_check.sh")], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stderr


@pytest.mark.skipif(any(importlib.util.find_spec(name) is None for name in NEEDS),
                    reason="the smoke run needs torch, transformers and JAX")
def test_the_smoke_run_writes_every_section(tmp_path, monkeypatch) -> None:
    spec = importlib.util.spec_from_file_location("gpu_check", BENCHMARKS / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    gpu_check = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", gpu_check)  # dataclasses look their module up
    spec.loader.exec_module(gpu_check)  # its names only: main() is what changes sys.path
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_check.py"), "--smoke"],
                          capture_output=True, text=True, timeout=180,
                          env={**os.environ, "OUT": str(out)})  # the default file: $OUT/gpu_check.md
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    text = (out / "gpu_check.md").read_text()
    assert "**error**" not in text, text
    headings = re.findall(r"^## \d+\. (.+)$", text, flags=re.MULTILINE)
    assert headings == list(gpu_check.SECTIONS)
    sections = dict(zip(headings, re.split(r"^## \d+\. .+$", text, flags=re.MULTILINE)[1:]))
    assert gpu_check.NO_CUDA in sections["CUDA tests"]
    # every other section measured something: a table with at least one row of figures
    for name in headings[1:]:
        assert re.search(r"^\| [-0-9.]+ ", sections[name], flags=re.MULTILINE) or \
            re.search(r"^\| (bf16|fp16)", sections[name], flags=re.MULTILINE), (name, sections[name])
    assert "fp16 autocast + GradScaler" in sections["Mixed precision"]
    assert sections["Tiled InfoNCE headline"].count("### Headline") == len(gpu_check.SMOKE.headline_rows)
    assert "### Tiled InfoNCE value_and_grad" in sections["JAX"]
    assert "### cached_step under jit" in sections["JAX"]
