"""gradcache for JAX: a functional, jit-able ``cached_step`` returning ``(loss, grads)``.

``grads`` has the structure of ``params`` (a dict, a Flax ``nnx.State`` or Linen variables, an
Equinox module), ready for optax. The chunk loop compiles to ``lax.scan``, so the program and its
compile time do not grow with the number of chunks. With ``distributed=mesh`` (or the axis name,
inside your own ``jax.shard_map``) the batch is split over devices and every device returns the
global batch's loss and gradients. Importing this package imports JAX.
"""

try:
    import jax  # noqa: F401
except ImportError:  # pragma: no cover - exercised only without jax
    from gradcache._distribution import install_hint

    raise ImportError(f"gradcache_jax needs JAX: {install_hint('jax')}") from None

from gradcache import GradCacheError
from gradcache_jax._backend import JaxBackend, chunk_key
from gradcache_jax._check_errors import unwrap_check_errors

# the pieces of a distributed step, for composing one with gradcache.run_cached_step (the plain way
# is cached_step(distributed=...)), as torch and TF export their collectives
from gradcache_jax._distributed import MeshCollective, ShardedJaxBackend
from gradcache_jax._loss import cached_loss
from gradcache_jax._step import cached_step

__all__ = [
    "GradCacheError",
    "JaxBackend",
    "MeshCollective",
    "ShardedJaxBackend",
    "cached_loss",
    "cached_step",
    "chunk_key",
    "unwrap_check_errors",
]
