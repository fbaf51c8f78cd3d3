"""Errors that cross process boundaries: a gRPC status code name plus a message.

Every process raises and carries these, never bare strings; the gateway turns them into
gRPC statuses at the edge.
"""

from __future__ import annotations

# The gRPC status names we use (grpc.StatusCode member names), kept as plain strings so
# that the worker and scheduler need not import grpc.
INVALID_ARGUMENT = "INVALID_ARGUMENT"
NOT_FOUND = "NOT_FOUND"
RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
UNAVAILABLE = "UNAVAILABLE"
DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
CANCELLED = "CANCELLED"
ALREADY_EXISTS = "ALREADY_EXISTS"
INTERNAL = "INTERNAL"


class RequestError(Exception):
    """A request that cannot be served, with the gRPC status it deserves."""

    def __init__(self, code: str, message: str, field: str | None = None):
        self.code = code
        self.field = field
        self.reason = message
        self.message = f"{field}: {message}" if field else message
        super().__init__(self.message)


def invalid(field: str, message: str) -> RequestError:
    return RequestError(INVALID_ARGUMENT, message, field)


def under(prefix: str, error: RequestError) -> RequestError:
    """The same error with its field named from an enclosing message ("sampling.top_p")."""
    field = f"{prefix}.{error.field}" if error.field else prefix
    return RequestError(error.code, error.reason, field)
