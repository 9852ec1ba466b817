"""Test-wide settings: hypothesis profiles for everyday runs, CI and deep exploration.

On CI (``CI`` set) the draws are derandomised, so that a landing never hinges on luck. A deep run
(``make test-deep``: ``GRADCACHE_DEEP=10``) multiplies every property test's example budget (see
:func:`gradcache.testing.examples`; tests without their own budget get the profile's) and draws
afresh each time: the long random exploration, kept out of the everyday suite's time.
"""

import os

from hypothesis import settings

from gradcache.testing import examples

settings.register_profile("ci", derandomize=True, print_blob=True)
settings.register_profile("dev", print_blob=True)
settings.register_profile("deep", max_examples=examples(100), print_blob=True)
if os.environ.get("GRADCACHE_DEEP"):
    settings.load_profile("deep")
else:
    settings.load_profile("ci" if os.environ.get("CI") else "dev")
