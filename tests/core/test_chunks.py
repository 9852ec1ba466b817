"""The core's split of a group's chunks between a backend's compiled loop and one-by-one calls.

A numpy backend with a pretend compiled loop (a Python loop that hands the body a counter which is
not an int, as ``lax.scan`` hands a tracer) shows, with no framework installed, what the JAX and
TensorFlow loops rely on: the full chunks go to the loop and the shorter last chunk runs by itself;
the last chunk also runs by itself when the backend reads ``final_use``, which is then a plain
bool; pass 2 repeats pass 1's split with pass 1's per-chunk records, stacked; a trace-time error
names the chunk a chunk-by-chunk loop would have failed on; a declined loop runs one by one.
"""

from __future__ import annotations

import numpy as np
import pytest

from gradcache import ChunkPlan, run_cached_step
from gradcache._chunks import loop_length
from gradcache.testing import LinearEncoder, NumpyBackend, NumpyInfoNCE


class LoopingBackend(NumpyBackend):
    """``NumpyBackend`` with a loop over equal chunks whose counter is a 0-d array, not an int.

    ``first_alone`` runs chunk 0 with a Python int before the "traced" ones, as TensorFlow does.
    Records are ``[group, chunk]`` arrays, so pass 2 can tell whether it got the right one. The
    gradients start as zeros for ``encoder``'s weight: a loop's carry keeps its structure.
    """

    def __init__(self, encoder: LinearEncoder, *, reads_final_use: bool = True,
                 first_alone: bool = False, declines: bool = False):
        super().__init__()
        self.encoder = encoder
        self.reads_final_use = reads_final_use
        self.first_alone = first_alone
        self.declines = declines
        self.loops: list[int] = []         # count of every loop run
        self.pulled: list[tuple] = []      # (record, final_use) of every pass-2 chunk

    def zero_grads(self):
        return {id(self.encoder): {"weight": np.zeros_like(self.encoder.weight)}}

    def rng_capture(self, group, chunk):
        return np.asarray([group, chunk])

    def vjp(self, encoder, chunk, record, outputs, grads, *, final_use):
        assert isinstance(final_use, bool)
        self.pulled.append((tuple(int(v) for v in record), final_use))
        return super().vjp(encoder, chunk, record, outputs, grads, final_use=final_use)

    def loop_equal_chunks(self, body, carry, rows, count, size, items):
        if self.declines:
            return None
        self.loops.append(count)
        assert all(len(leaf) >= count * size for leaf in rows)
        outs, out_items = [], []
        for i in range(count):
            index = i if self.first_alone and i == 0 else np.asarray(i)
            chunk = [leaf[i * size:(i + 1) * size] for leaf in rows]
            item = [] if items is None else [leaf[i] for leaf in items]
            carry, out, out_item = body(carry, index, chunk, item)
            outs.append(out)
            out_items.append(out_item)
        rows_out = [np.concatenate(column) for column in zip(*outs)]
        stacked = [np.stack(column) for column in zip(*out_items)]
        return carry, rows_out, stacked


def _problem(rows: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    encoder = LinearEncoder(rng.normal(size=(4, 3)))
    return encoder, (rng.normal(size=(rows, 4)), rng.normal(size=(rows + 3, 4)))


@pytest.mark.parametrize("reads_final_use", [True, False])
@pytest.mark.parametrize("first_alone", [True, False])
@pytest.mark.parametrize("rows", [8, 9, 3, 1])
def test_looped_steps_equal_the_chunk_by_chunk_step(rows, first_alone, reads_final_use) -> None:
    encoder, inputs = _problem(rows)
    want_loss, want = run_cached_step(NumpyBackend(), encoder, inputs, NumpyInfoNCE(), chunk_size=2)
    backend = LoopingBackend(encoder, reads_final_use=reads_final_use,
                             first_alone=first_alone)
    loss, got = run_cached_step(backend, encoder, inputs, NumpyInfoNCE(), chunk_size=2)
    assert loss == want_loss
    np.testing.assert_allclose(got[id(encoder)]["weight"], want[id(encoder)]["weight"], rtol=1e-12)
    # every chunk of both groups was pulled back once, with pass 1's own record
    expected = [(g, c) for g, n in enumerate((rows, rows + 3)) for c in range(-(-n // 2))]
    assert [record for record, _ in backend.pulled] == expected


def test_the_last_chunk_runs_alone_where_final_use_is_read() -> None:
    encoder, inputs = _problem(8)   # group 0: 4 full chunks; group 1: 5 full and one of 1 row
    backend = LoopingBackend(encoder, reads_final_use=True)
    run_cached_step(backend, encoder, inputs, NumpyInfoNCE(), chunk_size=2)
    # group 0 is not the encoder's last group: its 4 chunks loop; group 1's last chunk is short
    assert backend.loops == [4, 5, 4, 5]
    assert [final for _, final in backend.pulled] == [False] * 9 + [True]

    encoder, inputs = _problem(8)
    inputs = (inputs[0], inputs[1][:8])   # group 1 now ends on a full chunk
    backend = LoopingBackend(encoder, reads_final_use=True)
    run_cached_step(backend, encoder, inputs, NumpyInfoNCE(), chunk_size=2)
    assert backend.loops == [4, 3, 4, 3]
    assert [final for _, final in backend.pulled] == [False] * 7 + [True]


def test_a_backend_ignoring_final_use_keeps_the_last_chunk_in_its_loop() -> None:
    encoder, inputs = _problem(8)
    inputs = (inputs[0], inputs[1][:8])
    backend = LoopingBackend(encoder, reads_final_use=False)
    run_cached_step(backend, encoder, inputs, NumpyInfoNCE(), chunk_size=2)
    assert backend.loops == [4, 4, 4, 4]
    assert not any(final for _, final in backend.pulled)


def test_loop_length() -> None:
    backend = LoopingBackend(_problem(1)[0])
    assert loop_length(backend, ChunkPlan.uniform(10, 4), True) == 2
    assert loop_length(backend, ChunkPlan.uniform(8, 4), True) == 1
    assert loop_length(backend, ChunkPlan.uniform(8, 4), False) == 2
    assert loop_length(backend, ChunkPlan((1, 4, 4)), False) == 0   # a split_fn's chunks
    backend.reads_final_use = False
    assert loop_length(backend, ChunkPlan.uniform(8, 4), True) == 2


def test_a_declined_loop_runs_one_by_one() -> None:
    encoder, inputs = _problem(9)
    want_loss, want = run_cached_step(NumpyBackend(), encoder, inputs, NumpyInfoNCE(), chunk_size=2)
    backend = LoopingBackend(encoder, declines=True)
    loss, got = run_cached_step(backend, encoder, inputs, NumpyInfoNCE(), chunk_size=2)
    assert loss == want_loss and backend.loops == []
    np.testing.assert_allclose(got[id(encoder)]["weight"], want[id(encoder)]["weight"], rtol=1e-12)


@pytest.mark.parametrize("first_alone, named", [(False, 0), (True, 1)])
def test_an_error_in_the_loop_body_names_the_first_chunk_it_stands_for(first_alone, named) -> None:
    encoder, inputs = _problem(8)
    calls = {"n": 0}

    class Failing(LinearEncoder):
        def __call__(self, x):
            calls["n"] += 1
            if calls["n"] == 2:   # the loop body's first "traced" call when chunk 0 ran alone
                raise KeyError("inside the model")
            return super().__call__(x)

    failing = Failing(encoder.weight)
    with pytest.raises(KeyError) as info:
        run_cached_step(LoopingBackend(failing, first_alone=first_alone), failing, inputs, NumpyInfoNCE(),
                        chunk_size=2)
    # every "traced" call stands for the chunks from the first one not yet run alone: a real trace
    # fails on its first call, where a chunk-by-chunk loop would have failed on that chunk
    assert any(f"group 0, chunk {named} (pass 1)" in note for note in info.value.__notes__)
