"""``nydusd-py``: the daemon program (command line, pyfuse3 filesystem, FUSE session, failover side)."""
