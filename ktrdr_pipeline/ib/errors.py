"""IB errors, classified so that callers can act on them.

Every IB answer to a request ends in one of: data, *no data* (an empty success), a
retryable failure (pacing, 322, 366, disconnects, timeouts) or a clear failure that must
not be retried (unknown contract, invalid request, missing permissions).

Classification goes by **code first** (``docs/ib-facts.md`` §3). Only 162 needs its text,
and a non-English TWS translates it: the prefix "Historical Market Data Service error
message:" arrives as e.g. "Mensaje de error de los servicios de datos de mercado
históricos:" (wrighter/ib-scripts#1), and warnings such as 2174 arrive wholly translated
(vnpy/vnpy_ib#12). So a 162 is recognised by the parts that stay put — the HMDS service's
own words after the prefix (``pacing``, ``HMDS query returned no data``), and machine
identifiers such as ``EUR/CASH@FXSUBPIP Last 1d`` — and a 162 that matches none of them is
:attr:`ErrorKind.UNRECOGNISED`: neither pacing nor no data, never an empty success, never
retried forever. How a *translated pacing* message is still handled: hard pacing applies
only to bars of 30 secs or less and to head timestamps (IB's "Historical Data
Limitations", §1), so for those requests the fetcher treats an unrecognised 162 as a
possible pacing violation — it backs off through the pacing governor, whose windows know
that IB's limits were reached — but for at most the configured attempts, after which it
fails with IB's own text. For bars of 1 min and larger, which have no hard pacing, an
unrecognised 162 is retried with the ordinary backoff and then fails the same way.
"""

from __future__ import annotations

import re
from enum import Enum

from ..domain import ib_rules


class ErrorKind(Enum):
    NO_DATA = "no_data"
    PACING = "pacing"
    CANCELLED = "cancelled"
    RETRYABLE = "retryable"
    UNKNOWN_CONTRACT = "unknown_contract"
    VALIDATION = "validation"
    #: A bad request: the data type (whatToShow) does not exist for the instrument.
    NO_SUCH_DATA_TYPE = "no_such_data_type"
    PERMISSIONS = "permissions"
    EXPIRED = "expired"
    #: A 162 whose text matches none of IB's known ones (e.g. a translated TWS).
    UNRECOGNISED = "unrecognised"
    #: Informational (2100–2199, 165): never ends a request.
    WARNING = "warning"
    FATAL = "fatal"


#: The stable parts of 162's texts, lower case, matched anywhere in the message.
_PACING = ("pacing",)
_NO_DATA = ("hmds query returned no data", "returned no data", "no data of type")
_NO_SUCH_DATA_TYPE = ("no historical market data for",)
_TIME_LENGTH = ("time length exceed",)
_CANCELLED = ("query cancelled",)
_PERMISSIONS = ("no market data permissions", "permission")
#: ``EUR/CASH@FXSUBPIP Last 1d``: symbol/secType@venue, data type, step — the HMDS
#: identifiers of "No historical market data for …", untranslated in any language.
_INSTRUMENT_DATA_TYPE = re.compile(r"(?P<symbol>[^\s/@]+)/(?P<sec_type>[A-Z]+)@(?P<venue>\S+) "
                                   r"(?P<data_type>[A-Za-z]+) (?P<step>\w+)")

#: 10314 (invalid end date/time) and 10339 (continuous future with an end date) are bugs
#: in the request; 321 the same (validation).
_BAD_REQUEST_CODES = frozenset({ib_rules.ERR_VALIDATION, ib_rules.ERR_INVALID_END,
                                ib_rules.ERR_CONTFUT_END})


def _has(text: str, tokens: tuple[str, ...]) -> bool:
    return any(t in text for t in tokens)


def classify(code: int, message: str) -> ErrorKind:
    """What an IB error answer means for a loader (``docs/ib-facts.md`` §3)."""
    if code == ib_rules.ERR_HMDS:
        return _classify_hmds(message)
    if code == ib_rules.ERR_NO_SECURITY:
        return ErrorKind.UNKNOWN_CONTRACT
    if code in _BAD_REQUEST_CODES:
        return ErrorKind.VALIDATION
    if code in (ib_rules.ERR_NOT_SUBSCRIBED, 10167, 10168, 10089, 10090):
        return ErrorKind.PERMISSIONS
    if code == 166:
        return ErrorKind.EXPIRED
    if code in ib_rules.RETRYABLE_CODES:
        return ErrorKind.RETRYABLE
    if code == 165 or 2100 <= code < 2200:
        return ErrorKind.WARNING
    return ErrorKind.FATAL


def _classify_hmds(message: str) -> ErrorKind:
    text = message.lower()
    if _has(text, _PACING):
        return ErrorKind.PACING
    if _has(text, _NO_DATA):
        return ErrorKind.NO_DATA
    if _has(text, _NO_SUCH_DATA_TYPE) or _INSTRUMENT_DATA_TYPE.search(message):
        return ErrorKind.NO_SUCH_DATA_TYPE
    if _has(text, _TIME_LENGTH):
        return ErrorKind.VALIDATION
    if _has(text, _CANCELLED):
        return ErrorKind.CANCELLED
    if _has(text, _PERMISSIONS):
        return ErrorKind.PERMISSIONS
    return ErrorKind.UNRECOGNISED


def what_to_show_advice(message: str, sec_type: str | None = None,
                        what_to_show: str | None = None) -> str:
    """For "No historical market data for EUR/CASH@FXSUBPIP Last 1d": which whatToShow
    values do have bars for the instrument (its secType from the message, else the
    caller's)."""
    m = _INSTRUMENT_DATA_TYPE.search(message)
    kind = (m.group("sec_type") if m else None) or sec_type or ""
    works = [w for w in ib_rules.what_to_show_for(kind) if w != what_to_show]
    asked = f"whatToShow={what_to_show}" if what_to_show else "this whatToShow"
    where = f"{kind} instruments" if kind else "this instrument"
    return (f"IB has no {asked} bars for {where}: use one of {', '.join(works)} "
            f"(docs/ib-facts.md §2)")


class IBError(Exception):
    """An error answer from IB (or the lack of one) for one request."""

    kind: ErrorKind = ErrorKind.FATAL

    def __init__(self, message: str, code: int | None = None, kind: ErrorKind | None = None,
                 ib_text: str | None = None):
        super().__init__(message)
        self.code = code
        #: IB's own words, as the gateway sent them (None when IB sent nothing).
        self.ib_text = ib_text
        if kind is not None:
            self.kind = kind

    @property
    def retryable(self) -> bool:
        return self.kind in (ErrorKind.PACING, ErrorKind.RETRYABLE, ErrorKind.UNRECOGNISED)

    @classmethod
    def from_answer(cls, code: int, message: str, context: str = "", *,
                    sec_type: str | None = None, what_to_show: str | None = None) -> IBError:
        """The error for IB's answer ``code``/``message`` to the request ``context``;
        ``sec_type`` and ``what_to_show`` (the request's) sharpen the advice of a bad
        whatToShow."""
        kind = classify(code, message)
        where = f" ({context})" if context else ""
        text = f"IB error {code}: {message}{where}"
        if kind is ErrorKind.NO_SUCH_DATA_TYPE:
            text += " — " + what_to_show_advice(message, sec_type, what_to_show)
        elif kind is ErrorKind.VALIDATION and "time length exceed" in message.lower():
            text += " — the duration is too long for the bar size (a bug in the request)"
        return {
            ErrorKind.UNKNOWN_CONTRACT: ContractNotFound,
            ErrorKind.VALIDATION: InvalidRequest,
            ErrorKind.NO_SUCH_DATA_TYPE: DataTypeUnavailable,
            ErrorKind.PERMISSIONS: NoPermission,
        }.get(kind, IBError)(text, code, kind, message)


class ContractNotFound(IBError):
    kind = ErrorKind.UNKNOWN_CONTRACT


class InvalidRequest(IBError):
    kind = ErrorKind.VALIDATION


class DataTypeUnavailable(InvalidRequest):
    """The whatToShow does not exist for the instrument (FX TRADES): a bad request."""

    kind = ErrorKind.NO_SUCH_DATA_TYPE


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
