"""The wheel as a user gets it: built, installed into a fresh venv with the ``[torch]`` extra, used.

The wheel is built from a copy of the checkout (so a stale ``build/`` never leaks into it) and
checked for what it ships. Then a fresh virtual environment, without pip and without the test
environment's packages, receives torch 2.13.0 and its dependencies -- hard links to the files the
test environment installed from the same pinned CPU wheel (copying or unpacking torch would cost
~30 s) -- and ``pip install --no-index 'gradient_cache-*.whl[torch]'`` must resolve the extra
against them and install the library alone. In that venv the core is imported first and must load
no framework, then one ``gradcache_torch.cached_step`` runs and matches the full-batch gradient.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement

pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("gradcache", "gradcache_torch", "gradcache_jax", "gradcache_tf", "gradcache_cli")
FRAMEWORKS = ("torch", "jax", "tensorflow", "keras")

USE = """
import json, sys
import gradcache
core_loaded = sorted(m for m in ("torch", "jax", "tensorflow", "keras") if m in sys.modules)
import torch
from gradcache_torch import cached_step

torch.manual_seed(0)
encoder = torch.nn.Linear(6, 4).double()
queries, passages = torch.randn(10, 6).double(), torch.randn(10, 6).double()

def info_nce(q, p):
    return torch.nn.functional.cross_entropy(q @ p.T, torch.arange(len(q)))

loss = cached_step(encoder, (queries, passages), info_nce, chunk_size=3)
cached = encoder.weight.grad.clone()
encoder.zero_grad()
info_nce(encoder(queries), encoder(passages)).backward()
import importlib.metadata as metadata
print(json.dumps({
    "core_loaded": core_loaded,
    "error": (cached - encoder.weight.grad).abs().max().item(),
    "files": [str(p) for p in metadata.files("gradient-cache")],
    "version": [gradcache.__version__, metadata.version("gradient-cache")],
    "where": gradcache.__file__,
}))
"""


def _build_wheel(out: Path) -> Path:
    source = out / "source"
    tracked = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                             cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in tracked:
        if name.split("/")[0] in (*PACKAGES, "pyproject.toml", "README.md", "LICENSE"):
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    # the test environment's setuptools (>= 77.0.3, which torch 2.13 requires; PEP 639 needs 77),
    # without build isolation: no download, ~2 s
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-index",
                    "--no-build-isolation", "-w", str(out), str(source)],
                   check=True, capture_output=True, timeout=120)
    (wheel,) = out.glob("gradient_cache-*.whl")
    return wheel


def _requirement_closure(*names: str) -> list[importlib.metadata.Distribution]:
    """The installed distributions ``names`` need, their dependencies included (extras left out)."""
    environment = default_environment()
    found: dict[str, importlib.metadata.Distribution] = {}
    todo = list(names)
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in found:
            continue
        found[name] = dist = importlib.metadata.distribution(name)
        for text in dist.requires or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({**environment, "extra": ""}):
                todo.append(requirement.name)
    return list(found.values())


def _link_into(site: Path, dist: importlib.metadata.Distribution) -> None:
    """Puts every file of ``dist`` into ``site`` as a hard link (a copy across file systems)."""
    for file in dist.files or []:
        origin = Path(dist.locate_file(file))
        target = site / file
        if not origin.is_file() or ".." in file.parts or target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(origin, target)
        except OSError:
            shutil.copy2(origin, target)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    return _build_wheel(tmp_path_factory.mktemp("wheel"))


def test_the_wheel_ships_the_packages_their_types_and_the_license(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    dist_info = f"gradient_cache-{wheel.name.split('-')[1]}.dist-info"
    assert tops == {*PACKAGES, dist_info}, tops      # no tests/, benchmarks/ or docs/
    for package in PACKAGES:
        assert f"{package}/py.typed" in names
    assert f"{dist_info}/licenses/LICENSE" in names
    metadata = zipfile.ZipFile(wheel).read(f"{dist_info}/METADATA").decode()
    assert "Name: gradient-cache\n" in metadata and "License-Expression: Apache-2.0\n" in metadata
    assert 'Requires-Dist: torch>=2.1; extra == "torch"' in metadata
    assert "gradcache = gradcache_cli._main:main" in zipfile.ZipFile(wheel).read(
        f"{dist_info}/entry_points.txt").decode()


@pytest.mark.slow
def test_a_fresh_venv_with_the_torch_extra_runs_a_cached_step(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=60)
    python = venv / "bin" / "python"
    site = Path(subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True).stdout.strip())
    assert site != Path(sysconfig.get_paths()["purelib"])
    for dist in _requirement_closure("torch", "numpy"):
        _link_into(site, dist)
    # pip of the test environment, acting on the new venv; no index: torch must be the pinned one
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-index",
         "--disable-pip-version-check", f"{wheel}[torch]"],
        env=env, capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stdout + install.stderr
    assert "Successfully installed gradient-cache-" in install.stdout, install.stdout
    assert re.search(r"Requirement already satisfied: torch>=2\.1 .*\(2\.13\.0", install.stdout), \
        install.stdout

    ran = subprocess.run([python, "-c", USE], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr
    assert ran.stderr == "", ran.stderr     # no warning (the original `gradcache` is absent)
    found = json.loads(ran.stdout.splitlines()[-1])
    assert found["core_loaded"] == []
    assert found["error"] < 1e-12
    assert found["where"].startswith(str(site))
    assert found["version"][0] == found["version"][1]
    assert sum(path.endswith("py.typed") for path in found["files"]) == len(PACKAGES)
    assert (venv / "bin" / "gradcache").exists()
