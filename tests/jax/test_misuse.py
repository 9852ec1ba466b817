"""What a wrong call gets from the JAX adapter: a loss that gathers itself outside a distributed step.
Each case asserts the exception type and that the message names the cause.
"""

from __future__ import annotations

import jax
import pytest

from gradcache import GradCacheError
from gradcache_jax import cached_loss, cached_step
from tests.jax.common import batch, tower, tower_params

with jax.enable_x64(True):   # this folder's float64 is switched on per test; the batch is made now
    Q, D = batch(8), batch(8, seed=2)


# -- a loss that gathers itself, outside a distributed step -------------------------------------------
def test_across_ranks_outside_a_distributed_step_names_jax_spellings():
    from gradcache_jax.losses import across_ranks
    from gradcache_jax.losses import info_nce as tiled_info_nce

    loss = across_ranks(tiled_info_nce, axis_name="batch")
    for call in (lambda: cached_step(tower, (Q, D), loss, chunk_size=4, params=tower_params()),
                 lambda: cached_loss(tower, (Q, D), loss, chunk_size=4)):
        with pytest.raises(GradCacheError, match=r"distributed=mesh \(or True.*distributed='batch'"):
            call()
