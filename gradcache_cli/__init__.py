"""gradcache's tools: the ``gradcache`` command line, its demo and its bench, kept out of the library.

The library is ``gradcache`` (the framework-neutral core) and its adapters ``gradcache_torch``,
``gradcache_jax`` and ``gradcache_tf``; none of them imports this package. This package uses them:

* :mod:`gradcache_cli._main` -- the ``gradcache`` console script (also ``python -m gradcache_cli``):
  ``gradcache demo`` and ``gradcache bench``.
* :mod:`gradcache_cli.demo` -- the demo, code search on the standard library, one module per
  framework.
* :mod:`gradcache_cli.bench` -- the bench, memory and speed curves of the cached step against the
  full-batch step, measured in child processes.
* :mod:`gradcache_cli.memory` -- peak resident-memory measurement, the one helper that the demo,
  the bench and the scripts in ``benchmarks/`` share; :mod:`gradcache_cli.tf_memory` reads
  TensorFlow's memory on top of it.
* :mod:`gradcache_cli.spawn` -- runs a function on local torch.distributed (gloo) ranks, for the
  tests and the distributed benchmarks.

Importing this package, the command line, or the demo's and bench's shared parts loads no
framework: a framework is imported only by the module of the backend that runs.
"""

__all__: list[str] = []
