"""The demo behind ``python -m gradcache demo``: code search on the Python standard library.

It trains a small dual encoder to find a function's source from its docstring (the CodeSearchNet
task, in miniature), with a contrastive batch far larger than the chunk that bounds memory, and
prints what the batch buys. The parts that do not depend on a framework live here and are shared:
the data set (:mod:`~gradcache._demo.data`), the tokenizer (:mod:`~gradcache._demo.tokenizer`),
retrieval metrics and report formatting (:mod:`~gradcache._demo.metrics`), and argument checks
(:mod:`~gradcache._demo.options`). Each framework gets one small sibling module
(``torch_demo``; later ``jax_demo``, ``tf_demo``) that builds and trains the model.

Importing this package must load no framework: the backend module is imported only once the
arguments are checked and the backend is chosen.
"""

__all__: list[str] = []
