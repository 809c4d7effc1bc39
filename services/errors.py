"""Typed errors of the service logic, named after the gRPC status codes they map to.

The logic raises these and knows nothing about gRPC; the gRPC servicers map `code` onto grpc.StatusCode, and a
Ray Serve deployment or an HTTP front end can map them onto its own statuses.
"""

from __future__ import annotations


class ServiceError(Exception):
    code = "INTERNAL"


class InvalidArgument(ServiceError):
    code = "INVALID_ARGUMENT"


class NotFound(ServiceError):
    code = "NOT_FOUND"


class ResourceExhausted(ServiceError):
    code = "RESOURCE_EXHAUSTED"


class FailedPrecondition(ServiceError):
    code = "FAILED_PRECONDITION"
