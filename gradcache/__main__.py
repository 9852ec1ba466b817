"""``python -m gradcache``: the same command line as the ``gradcache`` console script."""

from gradcache._cli import main

raise SystemExit(main())
