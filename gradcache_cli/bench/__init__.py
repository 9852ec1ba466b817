"""``gradcache bench`` (``make bench``): memory and speed of the cached step against the full-batch step.

The parts: :mod:`~gradcache_cli.bench.runner` plans the sweep, runs each measurement in a child
process and reports (argument handling included); :mod:`~gradcache_cli.bench.child` is that child
process; :mod:`~gradcache_cli.bench.model` is the framework-free description of the benchmark's
model, batches and sweep; :mod:`~gradcache_cli.bench.report` writes ``results.md``, ``results.json``
and the plots. ``torch_bench``, ``jax_bench`` and ``tf_bench`` hold each framework's jobs and are
imported only in a child process. Importing this package loads no framework.
"""

__all__: list[str] = []
