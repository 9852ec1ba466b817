"""``python -m gradcache``: forwards to the ``gradcache`` command line, which lives in ``gradcache_cli``.

Only ``python -m gradcache`` runs this module; ``import gradcache`` never imports it, so the core
still imports neither the tools nor any adapter.
"""

from gradcache_cli._main import main

raise SystemExit(main())
