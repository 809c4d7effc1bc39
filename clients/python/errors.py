"""AevaeError: every failure of a call, with the gRPC status code and the server's message."""

from __future__ import annotations

import grpc


class AevaeError(Exception):
    """A failed call. `.code()` is a grpc.StatusCode, `.details()` the message (what was wrong, what is accepted)."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self._code = code
        self._details = details

    def __reduce__(self) -> tuple[type["AevaeError"], tuple[grpc.StatusCode, str]]:
        """Copied and pickled from its code and details (gRPC copies a failed call's response, which for an
        unreadable one is this error: rebuilt from its one message argument, the copy raised TypeError)."""
        return type(self), (self._code, self._details)

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    @classmethod
    def from_rpc(cls, error: grpc.RpcError) -> "AevaeError":
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        details = error.details() if hasattr(error, "details") else str(error)
        return cls(code or grpc.StatusCode.UNKNOWN, details or "")


def invalid(details: str) -> AevaeError:
    """An argument the client can reject before sending anything."""
    return AevaeError(grpc.StatusCode.INVALID_ARGUMENT, details)


def bad_answer(details: str) -> AevaeError:
    """An answer the server should not have given (unreadable, or not what was asked): never returned as data,
    because the caller must get exactly its own rows."""
    return AevaeError(grpc.StatusCode.INTERNAL, f"the server's answer is not usable: {details}")
