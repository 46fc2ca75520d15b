"""IB's rules as the simulator enforces them.

The rules themselves (limits, durations, bar sizes, messages) come from
:mod:`ktrdr_pipeline.domain.ib_rules`, and pacing keys are built only by
:func:`ktrdr_pipeline.domain.pacing.bars_pacing_key` and
:func:`~ktrdr_pipeline.domain.pacing.head_timestamp_pacing_key`; this module turns them
into the error answers a gateway gives: request validation, contract resolution, the
pacing window, the open-request limit and the "no data" cases.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from ..domain import ib_rules
from ..domain.pacing import (
    PacedRequest,
    PacingWindow,
    bars_pacing_key,
    head_timestamp_pacing_key,
)
from .protocol import describe
from .universe import Instrument, Universe

#: Time zone of the simulated TWS login; end times without a zone are read in it.
LOGIN_TZ = "US/Eastern"

WHAT_TO_SHOW = frozenset(ib_rules.WHAT_TO_SHOW)


class RequestError(Exception):
    """An IB error answer to one request."""

    def __init__(self, code: int, message: str):
        super().__init__(f"{code} {message}")
        self.code = code
        self.message = message


# -- request validation -------------------------------------------------------------------
_END_FORMS = (
    re.compile(r"^(\d{8})-(\d{2}):(\d{2}):(\d{2})$"),  # UTC
    re.compile(r"^(\d{8}) {1,2}(\d{2}):(\d{2}):(\d{2})(?: (\S+))?$"),
)


def parse_end_datetime(text: str, now: datetime) -> datetime:
    """An endDateTime in any form IB accepts; empty means now."""
    text = text.strip()
    if not text:
        return now
    m = _END_FORMS[0].match(text)
    if m:
        day, hh, mm, ss = m.groups()
        return datetime.strptime(day + hh + mm + ss, "%Y%m%d%H%M%S").replace(tzinfo=UTC)
    m = _END_FORMS[1].match(text)
    if m:
        day, hh, mm, ss, zone = m.groups()
        try:
            tz = ZoneInfo(zone or LOGIN_TZ) if zone not in ("GMT", "UTC") else UTC
        except (ZoneInfoNotFoundError, ValueError):
            raise RequestError(ib_rules.ERR_VALIDATION,
                               f"Error validating request.-'bW' : cause - Invalid time zone "
                               f"{zone!r} in end date/time {text!r}") from None
        return datetime.strptime(day + hh + mm + ss, "%Y%m%d%H%M%S").replace(tzinfo=tz)
    if re.fullmatch(r"\d{8}", text):
        d = datetime.strptime(text, "%Y%m%d").replace(tzinfo=ZoneInfo(LOGIN_TZ))
        return d + timedelta(days=1)
    raise RequestError(ib_rules.ERR_VALIDATION,
                       f"Error validating request.-'bW' : cause - Invalid end date/time "
                       f"{text!r}: use 'YYYYMMDD HH:MM:SS [zone]', 'YYYYMMDD-HH:MM:SS' or ''")


def check_what_to_show(what: str) -> None:
    if what not in WHAT_TO_SHOW:
        raise RequestError(ib_rules.ERR_VALIDATION,
                           f"Error validating request.-'bS' : cause - Invalid whatToShow "
                           f"{what!r}")


def check_bars_request(bar_size: str, duration_text: str, what: str, rth_text: str,
                       fmt_text: str) -> ib_rules.Duration:
    """Validate a historical bars request's parameters (321); returns its duration."""
    if bar_size not in ib_rules.BAR_SIZE_SECONDS:
        raise RequestError(ib_rules.ERR_VALIDATION,
                           f"Error validating request.-'bP' : cause - Historical data bar "
                           f"size setting is invalid: {bar_size!r}. Legal ones are: "
                           f"{', '.join(ib_rules.BAR_SIZE_SECONDS)}")
    try:
        duration = ib_rules.parse_duration(duration_text)
    except ib_rules.DurationError as exc:
        raise RequestError(ib_rules.ERR_VALIDATION,
                           f"Error validating request.-'bQ' : cause - {exc}") from None
    check_what_to_show(what)
    if rth_text not in ("0", "1") or fmt_text not in ("1", "2"):
        raise RequestError(ib_rules.ERR_VALIDATION,
                           "Error validating request.-'bR' : cause - useRTH must be 0 or 1 "
                           "and formatDate 1 or 2")
    return duration


def check_max_duration(duration: ib_rules.Duration, bar_size: str) -> None:
    """IB's longest duration per bar size (``ib_rules.exceeds_max_duration``)."""
    if ib_rules.exceeds_max_duration(duration, bar_size):
        raise RequestError(ib_rules.ERR_VALIDATION,
                           f"Error validating request.-'bX' : cause - Time length exceed "
                           f"max: {duration} for bar size {bar_size}")


# -- contracts ----------------------------------------------------------------------------
def resolve_contract(universe: Universe, contract: dict[str, str], include_expired: bool,
                     now: datetime) -> Instrument:
    """The one instrument a request's contract names (200 if none or several)."""
    found = universe.match(contract, include_expired, now.date())
    if not found:
        raise RequestError(ib_rules.ERR_NO_SECURITY, ib_rules.MSG_NO_SECURITY)
    if len(found) > 1:
        raise RequestError(ib_rules.ERR_NO_SECURITY,
                           f"{ib_rules.MSG_AMBIGUOUS} ({len(found)} contracts match "
                           f"{describe(contract)})")
    return found[0]


# -- what data exists ---------------------------------------------------------------------
def no_data(inst: Instrument, what: str) -> RequestError:
    """162 "HMDS query returned no data" for one instrument and data type."""
    return RequestError(ib_rules.ERR_HMDS, f"{ib_rules.MSG_NO_DATA}: {inst.local_symbol}@"
                        f"{inst.exchange} {what.title()}")


def has_bars(inst: Instrument, what: str) -> bool:
    """Whether IB keeps bars of this data type for this instrument at all."""
    return not ((what == "TRADES" and inst.sec_type == "CASH")
                or (what == "ADJUSTED_LAST" and inst.sec_type != "STK")
                or (what.endswith("VOLATILITY") and inst.sec_type not in ("STK", "IND"))
                or inst.sec_type == "OPT")


def has_head_timestamp(inst: Instrument, what: str) -> bool:
    return not ((what == "TRADES" and inst.sec_type == "CASH") or inst.sec_type == "OPT")


def bars_window(end: datetime, now: datetime, duration: ib_rules.Duration,
                bar_size: str) -> tuple[datetime, datetime]:
    """The span a bars request covers: never past the clock, small bars at most
    :data:`~ktrdr_pipeline.domain.ib_rules.SMALL_BAR_HISTORY` back."""
    end = min(end, now)
    start = end - duration.span
    if ib_rules.is_small_bar(bar_size):
        start = max(start, now - ib_rules.SMALL_BAR_HISTORY)
    return start, end


# -- open requests ------------------------------------------------------------------------
class OpenRequests:
    """Historical requests not yet answered (or, for head timestamps, not yet cancelled);
    IB allows :data:`~ktrdr_pipeline.domain.ib_rules.MAX_OPEN_HISTORICAL_REQUESTS`."""

    def __init__(self) -> None:
        self._open: dict[tuple[int, str, int], float] = {}

    def __len__(self) -> int:
        return len(self._open)

    def claim(self, owner: int, kind: str, req_id: int) -> None:
        if len(self._open) >= ib_rules.MAX_OPEN_HISTORICAL_REQUESTS:
            raise RequestError(ib_rules.ERR_PROCESSING, ib_rules.MSG_TOO_MANY_OPEN)
        self._open[(owner, kind, req_id)] = time.monotonic()

    def release(self, owner: int, kind: str, req_id: int) -> None:
        self._open.pop((owner, kind, req_id), None)

    def release_all(self, owner: int) -> None:
        """Forget every open request of one connection (it is gone)."""
        for key in [k for k in self._open if k[0] == owner]:
            del self._open[key]


# -- pacing -------------------------------------------------------------------------------
def bars_paced(inst: Instrument, contract: dict[str, str], what: str, end_text: str,
               duration: str, bar_size: str, rth_text: str) -> PacedRequest:
    """The pacing identity of a bars request, as IB counts it."""
    exchange = contract.get("exchange") or inst.exchange
    return bars_pacing_key(str(inst.con_id), exchange, end_text, duration, bar_size, what,
                           rth_text == "1")


def head_timestamp_paced(inst: Instrument, contract: dict[str, str], what: str,
                         rth_text: str) -> PacedRequest:
    """The pacing identity of a head-timestamp request, as IB counts it."""
    return head_timestamp_pacing_key(str(inst.con_id), contract.get("exchange") or inst.exchange,
                                     what, rth_text == "1")


class PacingGuard:
    """IB's pacing windows over real (monotonic) time; a violation answers 162.

    ``on_violation(rule)`` is told which rule a rejected request broke (for the audit).
    """

    def __init__(self, limits: ib_rules.PacingLimits,
                 on_violation: Callable[[str], None] | None = None):
        self.window = PacingWindow(limits)
        self._on_violation = on_violation

    def check(self, request: PacedRequest) -> None:
        now = time.monotonic()
        self.window.prune(now)
        rule = self.window.violation(request, now)
        if rule is not None:
            if self._on_violation is not None:
                self._on_violation(rule)
            raise RequestError(ib_rules.ERR_HMDS, ib_rules.MSG_PACING_VIOLATION)
        self.window.record(request, now)
