"""Tools for testing gradcache backends: a reference numpy backend and the shared contract suite.

``NumpyBackend`` is a complete backend with hand-written gradients (the example of
``docs/extending.md``). ``gradcache.testing.contract`` holds ``BackendContract``, the property-based
test suite every adapter runs; import it from your own tests and subclass it with a harness for
your backend. It needs pytest and hypothesis (the ``testing`` extra); importing it without them
raises an ``ImportError`` that says so; this package itself needs neither. ``ThreadCollective``
and ``run_ranks`` run the distributed schedule on threads of one process. ``examples(n)`` is a
property test's example budget: ``n``, times ``GRADCACHE_DEEP`` in a deep run (``make test-deep``).
"""

from gradcache.testing._budget import examples
from gradcache.testing._numpy_backend import LinearEncoder, NumpyBackend, NumpyInfoNCE
from gradcache.testing._threads import ThreadCollective, run_ranks

__all__ = ["LinearEncoder", "NumpyBackend", "NumpyInfoNCE", "ThreadCollective", "examples",
           "run_ranks"]
