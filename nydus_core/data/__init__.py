"""The data-plane library every daemon and tool shares.

`rafs` reads and writes RAFS v6 / EROFS bootstraps and native blobs, `cache` fills verified chunks
on demand, `remote` is the OCI distribution client, and `runtime` is the backend-neutral part of a
daemon program (its JSON config, RAFS instances, state and HTTP API). Nothing here imports the
control plane: a daemon process never loads the snapshotter.
"""
