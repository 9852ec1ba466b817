"""The demo's data set: extraction rules, determinism, the split by module, and the cache."""

from __future__ import annotations

import gzip
import textwrap

import pytest

from gradcache_cli.demo import data


def test_the_data_set_has_thousands_of_usable_pairs(all_pairs):
    assert len(all_pairs) >= 3000
    assert all(len(pair.query.split()) >= 3 and pair.code for pair in all_pairs)
    assert len({pair.query.lower() for pair in all_pairs}) == len(all_pairs)  # unique queries
    assert len({pair.module for pair in all_pairs}) > 50


def test_extraction_is_deterministic():
    root = data.stdlib_dir() / "json"  # a small package: the rule, not the size, is under test
    first, second = data.extract_pairs(root), data.extract_pairs(root)
    assert first and first == second


def test_the_cache_holds_exactly_what_extraction_gives(demo_cache, all_pairs):
    assert data.cache_path(demo_cache).exists()
    assert all_pairs == data.extract_pairs()
    again, source = data.load_pairs(demo_cache)
    assert again == all_pairs and source.startswith("cache ")


def test_split_is_by_module_and_fixed_by_the_seed(all_pairs):
    train, test = data.split_by_module(all_pairs, test_fraction=0.2, seed=0)
    assert {p.module for p in train}.isdisjoint({p.module for p in test})
    assert len(train) + len(test) == len(all_pairs)
    assert 0.2 <= len(test) / len(all_pairs) <= 0.25
    assert (train, test) == data.split_by_module(all_pairs, test_fraction=0.2, seed=0)
    _, other = data.split_by_module(all_pairs, test_fraction=0.2, seed=1)
    assert {p.module for p in other} != {p.module for p in test}


def test_no_single_module_makes_up_the_test_set(all_pairs):
    for seed in range(5):
        _, test = data.split_by_module(all_pairs, test_fraction=0.2, seed=seed)
        biggest = max(sum(p.module == m for p in test) for m in {p.module for p in test})
        assert biggest <= 0.25 * 0.2 * len(all_pairs) + 1


def test_load_dataset_splits_the_cached_pairs(demo_cache):
    dataset = data.load_dataset(demo_cache, seed=0)
    assert dataset.train and dataset.test
    assert {p.module for p in dataset.train}.isdisjoint({p.module for p in dataset.test})


def test_docstrings_are_cut_out_and_odd_functions_skipped(tmp_path):
    source = textwrap.dedent('''
        import functools

        @functools.cache
        def decorated(a, b):
            """Add two numbers together, with a cache.

            More text that is not part of the query.
            """
            # keep this comment
            return a + b

        def only_doc():
            """A function whose body is only its docstring."""

        def short_doc():
            """Too short."""
            return 1

        class Box:
            def put(self, item):
                \'\'\'Put one item into the box (non-ascii: caf\u00e9).\'\'\'
                self.items.append(item)

        def same_line(): "Docstring on the def line itself."; return 2
        \x0c
        def after_form_feed(x):
            """Return the square of the given number."""
            return x * x
    ''')
    (tmp_path / "mymod.py").write_text(source, encoding="utf-8")
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "test_x.py").write_text('def t():\n    """Tests are skipped here."""\n    return 1\n')
    pairs = {pair.name: pair for pair in data.extract_pairs(tmp_path)}
    assert sorted(pairs) == ["Box.put", "after_form_feed", "decorated"]
    decorated = pairs["decorated"]
    assert decorated.query == "Add two numbers together, with a cache."
    assert decorated.code == ("@functools.cache\ndef decorated(a, b):\n"
                              "    # keep this comment\n    return a + b")
    assert pairs["Box.put"].code == "def put(self, item):\n    self.items.append(item)"
    assert pairs["after_form_feed"].code == "def after_form_feed(x):\n    return x * x"
    assert {p.module for p in pairs.values()} == {"mymod"}


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("GRADCACHE_CACHE", str(tmp_path / "here"))
    assert data.cache_dir() == tmp_path / "here"
    monkeypatch.delenv("GRADCACHE_CACHE")
    assert data.cache_dir().name == "gradcache"


def test_a_corrupt_cache_is_rebuilt(tmp_path, monkeypatch):
    root = data.stdlib_dir() / "json"
    original = data.extract_pairs
    monkeypatch.setattr(data, "extract_pairs", lambda: original(root))
    path = data.cache_path(tmp_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb") as handle:
        handle.write(b"not json")
    pairs, source = data.load_pairs(tmp_path)
    assert pairs == original(root) and source.startswith("built from")
    assert data.load_pairs(tmp_path)[0] == pairs


def test_bad_test_fraction_is_refused():
    with pytest.raises(ValueError):
        data.split_by_module([], test_fraction=1.0)
