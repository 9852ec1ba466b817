"""gradcache for TensorFlow and Keras: ``cached_step`` returns full-batch-exact ``(loss, grads)``;
``cached_loss`` returns a loss whose ``tape.gradient`` is that gradient.

``grads`` is aligned with the variables (by default the encoders' trainable variables, then the
loss's), ready for ``optimizer.apply_gradients``. It runs eagerly and inside ``tf.function``, with
or without XLA. Also here: ``GradCacheModel``, a ``keras.Model`` whose ``fit`` trains with the
cached step (imported on first use, so that this package does not import Keras by itself), and the
backend for anyone composing their own step. ``cached_step(..., distributed=True)`` inside
``strategy.run`` takes one step over the global batch of a ``tf.distribute`` strategy (its
collective: ``ReplicaCollective``). See ``docs/tf.md``.
"""

import os
import sys

if "tensorflow" not in sys.modules:
    # Keep TensorFlow's C++ start-up chatter down unless the user chose a level themselves.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

try:
    import tensorflow as tf  # noqa: F401
except ImportError:  # pragma: no cover - exercised only without TensorFlow
    from gradcache._distribution import install_hint

    raise ImportError(f"gradcache_tf needs TensorFlow: {install_hint('tf')}") from None

from gradcache import GradCacheError
from gradcache_tf._backend import TFBackend
from gradcache_tf._distributed import ReplicaCollective
from gradcache_tf._loss import cached_loss
from gradcache_tf._rng import RandomSources
from gradcache_tf._step import cached_step, trainable_variables

__all__ = [
    "GradCacheError",
    "GradCacheModel",
    "RandomSources",
    "ReplicaCollective",
    "TFBackend",
    "cached_loss",
    "cached_step",
    "trainable_variables",
]


def __getattr__(name: str):
    # GradCacheModel subclasses keras.Model: import Keras only when it is asked for.
    if name == "GradCacheModel":
        from gradcache_tf._keras import GradCacheModel
        return GradCacheModel
    raise AttributeError(f"module 'gradcache_tf' has no attribute {name!r}")
