"""Errors that carry the gRPC status containerd branches on.

containerd maps status codes back to its errdefs (it looks at the code, not the text), so each
error kind here is tied to exactly one ``grpc.StatusCode``, named by `SnapshotterError.grpc_status`.
The name, not the enum: daemons and tools raise these errors too and must not import grpc (its
import alone costs a daemon's start-up tens of milliseconds); the gRPC service turns the name into
the code (`status_code`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import grpc


class SnapshotterError(Exception):
    """Base class; `grpc_status` names the ``grpc.StatusCode`` the service answers with."""

    grpc_status = "INTERNAL"


def status_code(exc: SnapshotterError) -> grpc.StatusCode:
    """The gRPC status of `exc` (imports grpc: for the service, not the data plane)."""
    import grpc

    code: grpc.StatusCode = getattr(grpc.StatusCode, exc.grpc_status)
    return code


class NotFound(SnapshotterError):
    grpc_status = "NOT_FOUND"


class AlreadyExists(SnapshotterError):
    grpc_status = "ALREADY_EXISTS"


class FailedPrecondition(SnapshotterError):
    grpc_status = "FAILED_PRECONDITION"


class InvalidArgument(SnapshotterError):
    grpc_status = "INVALID_ARGUMENT"


class Unavailable(SnapshotterError):
    grpc_status = "UNAVAILABLE"


class Unimplemented(SnapshotterError):
    grpc_status = "UNIMPLEMENTED"


class ConfigError(Exception):
    """A configuration file or flag is wrong; the message names the key and the file."""
