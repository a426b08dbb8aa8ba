"""The service's errors and the gRPC status each one maps to.

    TrackingError                 INTERNAL
    ├── InvalidArgument           INVALID_ARGUMENT   a field of the request is wrong
    ├── NotFound                  NOT_FOUND          the named thing does not exist
    ├── AlreadyExists             ALREADY_EXISTS     a create would overwrite
    ├── FailedPrecondition        FAILED_PRECONDITION not set up to do it
    ├── Unauthenticated           UNAUTHENTICATED    no or bad credentials
    ├── PermissionDenied          PERMISSION_DENIED  credentials do not allow this
    ├── ResourceExhausted         RESOURCE_EXHAUSTED back-pressure: retry later
    │   ├── FellBehind                               the client stopped reading
    │   └── Congested                                storage is behind: nothing stored
    └── Unavailable               UNAVAILABLE        a dependency is down: retry later
        └── StorageUnavailable                       the history store cannot write
            └── QueryCancelled                       the database cancelled a read
                └── QueryTimedOut DEADLINE_EXCEEDED  ... at its statement_timeout

Servicers and the core raise these; :mod:`tracking_grpc.interceptors` turns them into
statuses in one place. Repositories convert library errors into these at their
boundary (``raise StorageUnavailable(...) from exc``).
"""

from __future__ import annotations

import grpc


class TrackingError(Exception):
    """Base of the service's errors."""

    code = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(TrackingError):
    """A request field is missing, malformed or out of range."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class NotFound(TrackingError):
    """The named resource does not exist (for this tenant)."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(TrackingError):
    """A create names a resource that exists."""

    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(TrackingError):
    """The service is not set up to do this (for example no routing dataset)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Unauthenticated(TrackingError):
    """No credentials, or credentials that do not verify."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(TrackingError):
    """The caller's role or tenant does not allow the call."""

    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(TrackingError):
    """Too much in flight: the caller should slow down and retry."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FellBehind(ResourceExhausted):
    """The client did not read its stream for ``write_timeout_s``: the stream ends
    rather than hold what was written for it."""


class Congested(ResourceExhausted):
    """Storage is behind and this call may not wait for it: nothing of the call was
    stored, and it may be sent again after ``retry_after_s`` (a ``RetryInfo`` in
    the status details)."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(f"{message}; retry in {retry_after_s:g} s")
        self.retry_after_s = retry_after_s


class Unavailable(TrackingError):
    """A dependency is down; the call may succeed if retried later."""

    code = grpc.StatusCode.UNAVAILABLE


class StorageUnavailable(Unavailable):
    """The history store cannot take writes; nothing was acknowledged."""


class QueryCancelled(StorageUnavailable):
    """PostgreSQL cancelled a read itself (an operator's ``pg_cancel_backend``, its
    ``lock_timeout``): not tried again at once, since it would likely meet the
    same fate; the caller may retry later."""


class QueryTimedOut(QueryCancelled):
    """PostgreSQL cancelled a read at its ``statement_timeout``: the same read
    would run out of time again."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
