"""The core and the demo's shared parts load no framework; only the chosen backend's module does."""

from __future__ import annotations

import subprocess
import sys
import textwrap

FRAMEWORKS = ("torch", "jax", "jaxlib", "tensorflow", "keras", "flax", "sentence_transformers")


def _loaded_frameworks(code: str) -> list[str]:
    script = textwrap.dedent(code) + textwrap.dedent(f"""
        import sys
        print(sorted(m for m in {FRAMEWORKS!r} if m in sys.modules))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return eval(done.stdout.strip().splitlines()[-1])  # a printed list of module names


def test_import_gradcache_loads_no_framework():
    assert _loaded_frameworks("import gradcache") == []


def test_demo_shared_parts_and_cli_load_no_framework():
    # Argument errors, for any backend, are answered before any framework loads.
    code = """
        from gradcache_cli import _main, memory  # noqa: F401
        from gradcache_cli.demo import data, metrics, options, runner, tokenizer  # noqa: F401
        _main.main(["demo", "--chunk-size", "9", "--batch-size", "8"])
        _main.main(["demo", "--backend", "jax", "--chunk-size", "9", "--batch-size", "8"])
    """
    assert _loaded_frameworks(code) == []
