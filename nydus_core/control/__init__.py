"""The control plane: what runs inside ``containerd-nydus-grpc``.

`snapshot` serves containerd's snapshots API, `daemons` keeps the records of the daemons that serve
lazily pulled images and drives them through their backend records, `system` is the operators'
HTTP API, `formats` and `credentials` are the built-in plugins of image detection and registry
credentials. Nothing here runs inside a daemon.
"""
