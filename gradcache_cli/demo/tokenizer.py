"""A hashed word-piece tokenizer for docstrings and code, in numpy and the standard library.

No vocabulary to train or download: text is cut into words, each identifier also into its
``snake_case`` and ``camelCase`` pieces (``read_text`` gives ``read_text``, ``read``, ``text``), and
every piece is hashed with CRC-32 -- stable across runs and machines, unlike Python's salted
``hash`` -- into a fixed number of buckets. A docstring saying "read the text" and a body calling
``read_text`` then share ids, which is what a code-search model needs to learn from. Id 0 is padding;
id 1 marks an empty text, so that every row has at least one token.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable

import numpy as np

PAD = 0
EMPTY = 1
_RESERVED = 2

# Words: identifiers (letters, digits, underscores) and numbers; punctuation carries little for
# retrieval and would crowd the truncated sequences.
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|[0-9]+")
# Pieces of one identifier: acronyms (HTTP in HTTPServer), capitalised or lower words, digit runs.
_PIECE = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|[0-9]+")


def word_pieces(text: str) -> list[str]:
    """The lower-cased pieces of ``text``, in order: each word, then its sub-pieces if it has several.

    >>> word_pieces("Return the HTTPServer's read_text()")
    ['return', 'the', 'httpserver', 'http', 'server', 's', 'read_text', 'read', 'text']
    """
    out: list[str] = []
    for word in _WORD.findall(text):
        pieces = _PIECE.findall(word)
        out.append(word.lower())
        if len(pieces) > 1:
            out.extend(piece.lower() for piece in pieces)
    return out


class HashTokenizer:
    """Maps texts to fixed-length rows of hashed piece ids (numpy ``int64``, 0-padded).

    Args:
        buckets: number of ids, reserved ones included; pieces land in ``[2, buckets)``.

    >>> tok = HashTokenizer(buckets=1000)
    >>> ids = tok.encode(["read the text", ""], max_len=4)
    >>> ids.shape, ids.dtype.name
    ((2, 4), 'int64')
    >>> bool((ids[0, :3] >= 2).all()), int(ids[0, 3]), ids[1].tolist()
    (True, 0, [1, 0, 0, 0])
    >>> bool(tok.encode(["read_text"], max_len=3)[0, 1] == ids[0, 0])  # 'read' is shared
    True
    """

    def __init__(self, buckets: int = 1 << 16):
        if buckets <= _RESERVED:
            raise ValueError(f"buckets must be > {_RESERVED}, got {buckets}")
        self.buckets = buckets
        self._cache: dict[str, int] = {}

    def piece_id(self, piece: str) -> int:
        """The id of one piece (memoised: identifiers repeat a lot in code)."""
        found = self._cache.get(piece)
        if found is None:
            found = _RESERVED + zlib.crc32(piece.encode("utf-8")) % (self.buckets - _RESERVED)
            self._cache[piece] = found
        return found

    def ids(self, text: str) -> list[int]:
        """The ids of every piece of ``text``, untruncated."""
        return [self.piece_id(piece) for piece in word_pieces(text)]

    def encode(self, texts: Iterable[str], max_len: int) -> np.ndarray:
        """A ``(len(texts), max_len)`` array of ids; longer texts are cut, shorter ones padded."""
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        texts = list(texts)
        out = np.zeros((len(texts), max_len), dtype=np.int64)
        for row, text in enumerate(texts):
            ids = self.ids(text)[:max_len] or [EMPTY]
            out[row, :len(ids)] = ids
        return out
