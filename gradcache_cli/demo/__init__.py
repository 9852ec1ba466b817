"""The demo behind ``gradcache demo`` (``make demo``): code search on the Python standard library.

It trains a small dual encoder to find a function's source from its docstring (the CodeSearchNet
task, in miniature), with a contrastive batch far larger than the chunk that bounds memory, and
prints what the batch buys. The parts that do not depend on a framework live here and are shared:
the data set (:mod:`~gradcache_cli.demo.data`), the tokenizer
(:mod:`~gradcache_cli.demo.tokenizer`), retrieval metrics and report formatting
(:mod:`~gradcache_cli.demo.metrics`), argument checks (:mod:`~gradcache_cli.demo.options`) and the
story every backend tells (:mod:`~gradcache_cli.demo.runner`). Each framework gets one small sibling module
(``torch_demo``, ``jax_demo``, ``tf_demo``) that builds and trains the model; peak memory is
measured by :mod:`gradcache_cli.memory` (and :mod:`gradcache_cli.tf_memory`), shared with the bench.

Importing this package must load no framework: the backend module is imported only once the
arguments are checked and the backend is chosen.
"""

__all__: list[str] = []
