"""Errors that carry the gRPC status containerd branches on.

containerd maps status codes back to its errdefs (it looks at the code, not the text), so each
error kind here is tied to exactly one `grpc.StatusCode`.
"""

from __future__ import annotations

import grpc


class SnapshotterError(Exception):
    """Base class; `code` is the gRPC status the service answers with."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class NotFound(SnapshotterError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(SnapshotterError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(SnapshotterError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class InvalidArgument(SnapshotterError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class Unavailable(SnapshotterError):
    code = grpc.StatusCode.UNAVAILABLE


class Unimplemented(SnapshotterError):
    code = grpc.StatusCode.UNIMPLEMENTED


class ConfigError(Exception):
    """A configuration file or flag is wrong; the message names the key and the file."""
