"""The child process of ``gradcache bench``: one measurement job for one backend, answered in JSON.

``python -m gradcache_cli.bench.child JSON`` imports ``gradcache_cli.bench.<backend>_bench`` (and
with it the framework), runs the job named in the payload (``memory``: one step's peak memory;
``sweep``: the whole memory sweep, for JAX whose figures come from the compiler; ``time``: the
step-time ratio) and prints one JSON line, which :func:`gradcache_cli.bench.runner.run_child`
reads. A fresh process per measurement is the point: a peak can be read once, and allocators keep
what a step freed.

The measurement itself is :mod:`gradcache_cli.memory`'s (and, for TensorFlow,
:mod:`gradcache_cli.tf_memory`'s), shared with the demo. Standard library only at import time.
"""

from __future__ import annotations

import importlib
import json
import sys


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m gradcache_cli.bench.child JSON (used by gradcache bench)",
              file=sys.stderr)
        return 2
    payload = json.loads(argv[0])
    module = importlib.import_module(f"gradcache_cli.bench.{payload['backend']}_bench")
    result = getattr(module, payload["job"])(payload)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
