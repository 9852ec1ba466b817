"""``python -m gradcache_cli``: the same command line as the ``gradcache`` console script."""

from gradcache_cli._main import main

raise SystemExit(main())
