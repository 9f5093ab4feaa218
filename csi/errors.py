"""Errors with a gRPC status code, and the one mapping from any exception to a status.

Servicers raise `CsiError` (through the helpers below) for every outcome the CSI spec names. Anything else
is a bug or a failed command: it becomes INTERNAL with what went wrong, never UNKNOWN.
"""

from __future__ import annotations

import grpc

from csi.runner import CommandError, CommandNotFound, CommandTimeout

Code = grpc.StatusCode


class CsiError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


def invalid(message: str) -> CsiError:
    return CsiError(Code.INVALID_ARGUMENT, message)


def not_found(message: str) -> CsiError:
    return CsiError(Code.NOT_FOUND, message)


def exists(message: str) -> CsiError:
    return CsiError(Code.ALREADY_EXISTS, message)


def precondition(message: str) -> CsiError:
    return CsiError(Code.FAILED_PRECONDITION, message)


def out_of_range(message: str) -> CsiError:
    return CsiError(Code.OUT_OF_RANGE, message)


def exhausted(message: str) -> CsiError:
    return CsiError(Code.RESOURCE_EXHAUSTED, message)


def aborted(message: str) -> CsiError:
    return CsiError(Code.ABORTED, message)


def unavailable(message: str) -> CsiError:
    return CsiError(Code.UNAVAILABLE, message)


def internal(message: str) -> CsiError:
    return CsiError(Code.INTERNAL, message)


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status a client sees for `exc`."""
    if isinstance(exc, CsiError):
        return exc.code, exc.message
    if isinstance(exc, CommandTimeout):
        return Code.DEADLINE_EXCEEDED, str(exc)
    if isinstance(exc, CommandNotFound):
        if exc.rc == 127:   # missing where a wrapper (nsenter) looked: the host's own tools, not the image's
            return Code.FAILED_PRECONDITION, str(exc)
        return Code.FAILED_PRECONDITION, f"{exc.reason} on this host (the image installs it from deploy/packages.txt)"
    if isinstance(exc, CommandError):
        return Code.INTERNAL, str(exc)
    if isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
        code = exc.code()
        return (Code.INTERNAL if code in (None, Code.UNKNOWN) else code), exc.details() or str(exc)
    return Code.INTERNAL, f"{type(exc).__name__}: {exc}"
