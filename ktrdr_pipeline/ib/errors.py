"""IB errors, classified so that callers can act on them.

Every IB answer to a request ends in one of: data, *no data* (an empty success), a
retryable failure (pacing, 322, 366, disconnects, timeouts) or a clear failure that must
not be retried (unknown contract, invalid request, missing permissions).
"""

from __future__ import annotations

from enum import Enum

from ..domain import ib_rules


class ErrorKind(Enum):
    NO_DATA = "no_data"
    PACING = "pacing"
    CANCELLED = "cancelled"
    RETRYABLE = "retryable"
    UNKNOWN_CONTRACT = "unknown_contract"
    VALIDATION = "validation"
    PERMISSIONS = "permissions"
    EXPIRED = "expired"
    FATAL = "fatal"


def classify(code: int, message: str) -> ErrorKind:
    """What an IB error answer means for a loader (``docs/ib-facts.md`` §3)."""
    text = message.lower()
    if code == ib_rules.ERR_HMDS:
        if "pacing violation" in text:
            return ErrorKind.PACING
        if "returned no data" in text or "no data of type" in text:
            return ErrorKind.NO_DATA
        if "query cancelled" in text:
            return ErrorKind.CANCELLED
        if "permission" in text:
            return ErrorKind.PERMISSIONS
        return ErrorKind.RETRYABLE
    if code == ib_rules.ERR_NO_SECURITY:
        return ErrorKind.UNKNOWN_CONTRACT
    if code == ib_rules.ERR_VALIDATION:
        return ErrorKind.VALIDATION
    if code in (ib_rules.ERR_NOT_SUBSCRIBED, 10167, 10168, 10089, 10090):
        return ErrorKind.PERMISSIONS
    if code == 166:
        return ErrorKind.EXPIRED
    if code in ib_rules.RETRYABLE_CODES:
        return ErrorKind.RETRYABLE
    return ErrorKind.FATAL


class IBError(Exception):
    """An error answer from IB (or the lack of one) for one request."""

    kind: ErrorKind = ErrorKind.FATAL

    def __init__(self, message: str, code: int | None = None, kind: ErrorKind | None = None):
        super().__init__(message)
        self.code = code
        if kind is not None:
            self.kind = kind

    @property
    def retryable(self) -> bool:
        return self.kind in (ErrorKind.PACING, ErrorKind.RETRYABLE)

    @classmethod
    def from_answer(cls, code: int, message: str, context: str = "") -> IBError:
        kind = classify(code, message)
        where = f" ({context})" if context else ""
        text = f"IB error {code}: {message}{where}"
        return {
            ErrorKind.UNKNOWN_CONTRACT: ContractNotFound,
            ErrorKind.VALIDATION: InvalidRequest,
            ErrorKind.PERMISSIONS: NoPermission,
        }.get(kind, IBError)(text, code, kind)


class ContractNotFound(IBError):
    kind = ErrorKind.UNKNOWN_CONTRACT


class InvalidRequest(IBError):
    kind = ErrorKind.VALIDATION


class NoPermission(IBError):
    kind = ErrorKind.PERMISSIONS


class RequestTimeout(IBError):
    """IB did not answer in time; the request was cancelled (never an empty success)."""

    kind = ErrorKind.RETRYABLE


class Disconnected(IBError):
    """The connection dropped while a request was in flight."""

    kind = ErrorKind.RETRYABLE


class GatewayUnreachable(IBError):
    """No IB Gateway / TWS answers at the configured host and port."""

    kind = ErrorKind.FATAL
