# Two commands a newcomer needs: `make demo` and `make test`. Both build .venv when missing.
# `make docs` builds the documentation site into site/ (mkdocs.yml); `make test` builds it first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Test files run on this many worker processes (pytest-xdist), a whole file per worker so that a
# file's shared subprocesses and compiled steps are made once; 0 runs them in this process.
# The 15 slowest tests are listed at the end: where the CI budget (~12 min on 2 cores) goes.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15

.PHONY: test test-deep test-pythons demo bench docs lint clean

$(STAMP): pyproject.toml requirements/test.txt requirements/docs.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements/test.txt -r requirements/docs.txt
	# this checkout was installed as `gradcache` before the distribution became gradient-cache
	$(PY) -m pip uninstall -q -y gradcache 2>/dev/null || true
	# the package itself, editable; its dependencies are the pinned ones above
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

# The tests run every Python block of README.md and docs/*.md and every >>> example of the packages;
# the site is built first, in strict mode (a broken link or API reference fails).
test: docs
	$(PYTEST)

# NO_MKDOCS_2_WARNING: Material's end-of-life notice, printed on every build otherwise
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --quiet

# The long random exploration: every property test draws 10x its examples, afresh each run.
test-deep: $(STAMP)
	GRADCACHE_DEEP=10 $(PYTEST)

# The core's numpy tests on every Python the package claims (3.10-3.13), each in a small venv.
test-pythons:
	.ci/test-pythons

demo: $(STAMP)
	$(PY) -m gradcache_cli demo

bench: $(STAMP)
	$(PY) -m gradcache_cli bench --out bench-out

# ruff, then mypy over the core, the adapters and the CLI (files and settings: pyproject.toml).
# A cold run reads the torch, JAX and numpy stubs (tens of seconds); .mypy_cache makes reruns ~1 s.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m mypy

clean:
	rm -rf $(VENV) .venv-py* .pytest_cache .hypothesis .mypy_cache site
