"""``gradcache_cli.memory``, the one peak-memory helper of the demo, the bench and ``benchmarks/``.

Linux only, where the kernel's peak mark can be reset: what a known allocation adds shows up in the
peak above :func:`~gradcache_cli.memory.baseline`, and a capped step that fits reports its growth.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from gradcache_cli import memory

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or not memory.reset_peak(),
                                reason="needs Linux's resettable peak (/proc/self/clear_refs)")

MIB = 1 << 20


def _touch(size: int) -> bytearray:
    block = bytearray(size)
    for page in range(0, size, 4096):  # every page resident, whatever the allocator does
        block[page] = 1
    return block


def test_the_peak_above_the_baseline_counts_a_known_allocation():
    before = memory.baseline()
    block = _touch(64 * MIB)
    grown = memory.peak_rss_bytes() - before
    del block
    assert 60 * MIB <= grown < 200 * MIB


def test_a_capped_step_reports_its_growth_and_whether_it_fits():
    # In a fresh process: rss_growth caps the address space of the process it runs in.
    code = textwrap.dedent("""
        import json
        from gradcache_cli import memory

        def touch():
            block = bytearray(32 << 20)
            for page in range(0, len(block), 4096):
                block[page] = 1

        print(json.dumps([memory.rss_growth(touch, lambda: None, budget, memory.mentions_memory)
                          for budget in (512 << 20, 8 << 20)]))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    roomy, tight = json.loads(done.stdout.strip().splitlines()[-1])
    assert roomy["fits"] and 28 * MIB <= roomy["bytes"] < 150 * MIB
    assert not tight["fits"] and tight["bytes"] >= 28 * MIB  # measured, over the budget


def test_allocation_failures_are_told_apart_from_other_errors():
    assert memory.mentions_memory(RuntimeError("CUDA out of memory")) is True
    assert memory.mentions_memory(ValueError("shape mismatch")) is False


def test_the_fixed_mmap_environment_names_glibc_threshold():
    assert memory.fixed_mmap_env() == {"MALLOC_MMAP_THRESHOLD_": str(64 << 10)}
    assert memory.fixed_mmap_env(128 << 10) == {"MALLOC_MMAP_THRESHOLD_": "131072"}
