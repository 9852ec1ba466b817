"""Every Python block of ``README.md`` and ``docs/*.md`` runs, or says where it runs or why not.

The rules and the directive that tells a block's needs are in :mod:`tests.docs.blocks`. This file
checks that every block is accounted for, and runs the blocks of the pages without a runner of
their own (``blocks.PAGE_RUNNERS``) whose directive does not send them to another test file.
"""

from __future__ import annotations

import collections
from pathlib import Path

import pytest

from tests.docs import blocks

LOCAL = [chain for page in blocks.PAGES if page.name not in blocks.PAGE_RUNNERS
         for chain in blocks.chains(page) if "in" not in chain[0].options]
# the GPU blocks carry the `cuda` marker: benchmarks/gpu_check.sh selects them with `-m cuda`
LOCAL_PARAMS = [pytest.param(chain, marks=pytest.mark.cuda)
                if any("gpu" in block.options for block in chain) else chain for chain in LOCAL]


def test_every_block_is_run_somewhere_or_says_why_not():
    tally: collections.Counter = collections.Counter()
    for block in blocks.all_blocks():
        options = block.options
        if "in" in options:
            runner = blocks.ROOT / options["in"]
            assert runner.is_file(), f"{block}: in={options['in']} does not exist"
            assert "chains_run_in(__file__)" in runner.read_text(), \
                f"{block}: {options['in']} does not run the blocks that name it"
        if block.page.name in blocks.PAGE_RUNNERS:
            runner_text = (blocks.ROOT / blocks.PAGE_RUNNERS[block.page.name]).read_text()
            assert block.page.name in runner_text
            if block.lang == "python":
                # the page's runner takes every ```python block; a directive would be ignored
                assert not options, f"{block}: a ```python block of {block.page.name} takes no directive"
            else:
                assert {"in", "skip"} & options.keys(), \
                    f"{block}: a ```py block of {block.page.name} must say in= or skip="
    for page in blocks.PAGES:
        for chain in blocks.chains(page):
            head = chain[0].options
            kind = ("skipped" if "skip" in head else "gpu" if "gpu" in head else
                    "run elsewhere" if "in" in head or page.name in blocks.PAGE_RUNNERS else
                    "run here")
            tally[kind] += len(chain)
    # for the record (pytest -s): how the documentation's code is covered
    print(dict(tally), "of", sum(tally.values()), "Python blocks")
    assert tally["run here"] + tally["run elsewhere"] > 3 * (tally["skipped"] + tally["gpu"])


def test_every_setup_a_block_names_exists():
    """Checked here for all blocks, because a block that runs only elsewhere (on a GPU: no CI
    run) would otherwise find a misspelt setup only there (torch.md's GPU block did)."""
    from tests.docs import setups

    for block in blocks.all_blocks():
        for option in ("setup", "then"):
            for name in filter(None, (n.strip() for n in block.options.get(option, "").split(","))):
                assert callable(getattr(setups, name, None)), f"{block}: no setups.{name}"


@pytest.mark.parametrize("chain", LOCAL_PARAMS, ids=blocks.chain_id)
def test_block_runs(chain, tmp_path, monkeypatch):
    head = chain[0].options
    if "skip" in head:
        pytest.skip(head["skip"])
    if any("gpu" in block.options for block in chain):
        torch = pytest.importorskip("torch")
        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA device")
    monkeypatch.chdir(tmp_path)     # a block may write files (a trainer's output_dir)
    blocks.run_chain(chain)


def test_the_parser_sees_directives_and_indented_blocks(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("text\n\n<!-- test: setup=a,b; continue -->\n```python\nx = 1\n```\n\n"
                    "* item\n\n  ```py\n      def f(self):\n          return 1\n  ```\n")
    first, second = blocks.blocks(Path(page))
    assert first.options == {"setup": "a,b", "continue": ""} and first.code == "x = 1\n"
    assert first.line == 4 and second.lang == "py" and second.code.startswith("def f(self):")
    with pytest.raises(ValueError, match="unknown test directive 'skipp'"):
        page.write_text("<!-- test: skipp=x -->\n```python\npass\n```\n")
        blocks.blocks(page)
