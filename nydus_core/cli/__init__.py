"""Console scripts (``[project.scripts]`` in pyproject.toml).

* `nydus_core.cli.snapshotter` - ``containerd-nydus-grpc``, the snapshotter process;
* `nydus_core.cli.logsetup` - logging shared by the scripts (upstream's ``[log]`` section);
* `nydus_core.cli.rpclog` - debug logging of every snapshots RPC.
"""
