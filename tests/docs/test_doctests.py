"""Every ``>>>`` example in the packages runs as a doctest, here or in the test file named for it.

The modules of ``gradcache``, the adapters and ``gradcache_cli`` whose source holds an example are
found by reading the files, so a new one cannot be missed. Those in :data:`ELSEWHERE` run in a test
file of their framework's folder (where the framework is set up, e.g. Keras on TensorFlow); the
check below holds that file to naming the module. The rest run here: JAX's with its default
float32, as a user's session would. An example marked ``+SKIP`` must be listed in
:data:`SKIPPED_ELSEWHERE` with the test that runs it unskipped.
"""

from __future__ import annotations

import contextlib
import doctest
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("gradcache", "gradcache_torch", "gradcache_jax", "gradcache_tf", "gradcache_cli")
FRAMEWORK = {"gradcache_torch": "torch", "gradcache_jax": "jax", "gradcache_tf": "tensorflow"}

ELSEWHERE = {
    "gradcache._tiled": "tests/losses/test_docs.py",
    "gradcache._loss_forms": "tests/losses/test_docs.py",
    "gradcache_torch.losses": "tests/losses/test_docs.py",
    "gradcache_jax.losses": "tests/losses/test_docs.py",
    "gradcache_tf.losses": "tests/losses/test_docs.py",
    "gradcache._tile_ops": "tests/losses/test_binding.py",
    "gradcache._loss_api": "tests/losses/test_binding.py",
    "gradcache_torch._step": "tests/torch/test_doctests.py",
    "gradcache_torch._loss": "tests/torch/test_doctests.py",
    "gradcache_tf._step": "tests/tf/test_doctests.py",
    "gradcache_tf._loss": "tests/tf/test_doctests.py",
    "gradcache_tf._rng": "tests/tf/test_doctests.py",
    "gradcache_tf._keras": "tests/tf/test_doctests.py",
    "gradcache_cli.demo.metrics": "tests/demo/test_doctests.py",
    "gradcache_cli.demo.options": "tests/demo/test_doctests.py",
    "gradcache_cli.demo.runner": "tests/demo/test_doctests.py",
    "gradcache_cli.demo.tokenizer": "tests/demo/test_doctests.py",
    "gradcache_cli.demo.data": "tests/demo/test_doctests.py",
    "gradcache_cli.demo.torch_demo": "tests/demo/test_doctests.py",
    "gradcache_cli.demo.jax_demo": "tests/demo/test_backends.py",
    "gradcache_cli.demo.tf_demo": "tests/demo/test_backends.py",
}
# module -> the test that runs its +SKIP examples for real (they load a model by its hub name)
SKIPPED_ELSEWHERE = {
    "gradcache_torch.sentence_transformers": "tests/torch/test_sentence_transformers.py",
}


def _modules_with_examples() -> list[str]:
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if ">>>" in path.read_text(encoding="utf-8"):
                parts = path.relative_to(ROOT).with_suffix("").parts
                found.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return found


MODULES = _modules_with_examples()
HERE = [name for name in MODULES if name not in ELSEWHERE]


def test_every_module_with_examples_is_run_somewhere():
    assert len(MODULES) > 30, MODULES
    for module, test_file in {**ELSEWHERE, **SKIPPED_ELSEWHERE}.items():
        assert module in MODULES, f"{module} has no >>> example any more: drop it from the list"
        text = (ROOT / test_file).read_text()
        assert module in text or module.rsplit(".", 1)[-1] in text, (module, test_file)


@pytest.mark.parametrize("name", HERE)
def test_module_examples(name):
    package = name.split(".")[0]
    framework = FRAMEWORK.get(package)
    if framework:
        pytest.importorskip(framework)
    with contextlib.ExitStack() as stack:
        if framework == "jax":
            import jax
            stack.enter_context(jax.enable_x64(False))   # as a user runs the examples
        module = importlib.import_module(name)
        finder = doctest.DocTestFinder()
        runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
        skipped = 0
        for test in finder.find(module, name):
            skipped += sum(bool(example.options.get(doctest.SKIP)) for example in test.examples)
            runner.run(test)
        result = runner.summarize(verbose=False)
    assert result.failed == 0, result
    if name in SKIPPED_ELSEWHERE:
        assert skipped > 0
    else:
        assert result.attempted > 0 and skipped == 0, (result, skipped)
