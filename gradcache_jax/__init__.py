"""gradcache for JAX: a functional, jit-able ``cached_step`` returning ``(loss, grads)``.

``grads`` has the structure of ``params`` (a dict, a Flax ``nnx.State`` or Linen variables, an
Equinox module), ready for optax. The chunk loop compiles to ``lax.scan``, so the program and its
compile time do not grow with the number of chunks. Importing this package imports JAX.
"""

try:
    import jax  # noqa: F401
except ImportError:  # pragma: no cover - exercised only without jax
    raise ImportError("gradcache_jax needs JAX: pip install 'gradcache[jax]'") from None

from gradcache import GradCacheError
from gradcache_jax._backend import JaxBackend, chunk_key
from gradcache_jax._step import cached_step

__all__ = [
    "GradCacheError",
    "JaxBackend",
    "cached_step",
    "chunk_key",
]
