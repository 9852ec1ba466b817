"""The hashed word-piece tokenizer: pieces, stable ids, padding and truncation."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from gradcache_cli.demo.tokenizer import EMPTY, PAD, HashTokenizer, word_pieces


def test_identifiers_are_split_into_pieces():
    assert word_pieces("parseHTTPResponse") == ["parsehttpresponse", "parse", "http", "response"]
    assert word_pieces("read_text(path, 2)") == ["read_text", "read", "text", "path", "2"]
    assert word_pieces("  ... ,;") == []


def test_ids_are_stable_crc32_buckets_shared_by_docstring_and_code():
    tok = HashTokenizer(buckets=1 << 10)
    expected = 2 + zlib.crc32(b"read") % ((1 << 10) - 2)
    assert tok.piece_id("read") == expected
    assert tok.ids("Read the file")[0] == tok.ids("def read_file(): pass")[2]


def test_encode_pads_truncates_and_marks_empty_rows():
    tok = HashTokenizer(buckets=64)
    ids = tok.encode(["one two three four five", "one", ""], max_len=3)
    assert ids.shape == (3, 3) and ids.dtype == np.int64
    assert (ids[0] >= 2).all()
    assert ids[1, 1:].tolist() == [PAD, PAD]
    assert ids[2].tolist() == [EMPTY, PAD, PAD]
    assert ids.max() < 64


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError):
        HashTokenizer(buckets=2)
    with pytest.raises(ValueError):
        HashTokenizer().encode(["x"], max_len=0)
