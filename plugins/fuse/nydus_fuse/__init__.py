"""nydus-fuse: the ``fusedev`` backend of nydus-core and ``nydusd-py``, its FUSE daemon.

* `plugin` -- the entry point: the ``fusedev`` backend record and its config key;
* `backend` -- snapshotter side: failover, warm standbys, hot upgrade, crash-loop breaker;
* `daemon` -- the ``nydusd-py`` program (pyfuse3 + trio);
* `holder` (a standard-library-only process) and `supervisor` (its wire protocol) -- where FUSE
  sessions outlive their daemon.
"""

from __future__ import annotations
