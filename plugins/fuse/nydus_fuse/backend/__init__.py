"""The snapshotter side of the fusedev backend: failover, standbys, hot upgrade, the session holder client."""
