"""Session-wide settings for every test.

uv (the wheelhouse and double builds) trusts the system's CA store, as ./setup makes it do: behind
a TLS-intercepting proxy whose CA is installed in the system store, uv's own roots would refuse it.
"""

import os

os.environ.setdefault("UV_SYSTEM_CERTS", "1")
