"""Workload-optimized nydus images (`nydusify optimize`).

Modules:

* `access_trace` - fanotify: the files a workload opens on its root filesystem, in order.
* `workload` - run a workload once with runc on an overlay over the unpacked image, traced.
* `optimizer` - `optimize()`: unpack, run, and convert with the recorded prefetch list.
"""

from __future__ import annotations

from nydus_core.tools.optimize.optimizer import OptimizeOptions, OptimizeResult, optimize

__all__ = ["OptimizeOptions", "OptimizeResult", "optimize"]
