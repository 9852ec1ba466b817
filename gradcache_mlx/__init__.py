"""gradcache for Apple's MLX: ``cached_step`` and ``cached_loss`` over ``mlx.nn`` modules.

Gradients come back as ``nn.value_and_grad`` returns them, shaped like
``model.trainable_parameters()``; the tiled contrastive losses are in :mod:`gradcache_mlx.losses`.
See ``docs/mlx.md``.
"""

from gradcache_mlx._step import MLXBackend, cached_loss, cached_step

__all__ = ["MLXBackend", "cached_loss", "cached_step"]
