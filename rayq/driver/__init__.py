"""The Ray driver: places scoring actors, spreads batches over them and merges their sums."""

import os

# A local Ray instance that rayq starts must stay on 127.0.0.1; Ray 2.60 reads this variable
# when it is imported, so it is set before any rayq module imports ray.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
