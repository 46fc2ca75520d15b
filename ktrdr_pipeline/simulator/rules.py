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
from ..domain.calendars import HoursProfile
from ..domain.durations import request_start
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
    """An endDateTime in any form IB accepts; empty means now. Anything else, a time that
    does not exist or an unknown zone is answered 10314 with IB's text (§2)."""
    text = text.strip()
    if not text:
        return now
    try:
        m = _END_FORMS[0].match(text)
        if m:
            day, hh, mm, ss = m.groups()
            return datetime.strptime(day + hh + mm + ss, "%Y%m%d%H%M%S").replace(tzinfo=UTC)
        m = _END_FORMS[1].match(text)
        if m:
            day, hh, mm, ss, zone = m.groups()
            tz = ZoneInfo(zone or LOGIN_TZ) if zone not in ("GMT", "UTC") else UTC
            return datetime.strptime(day + hh + mm + ss, "%Y%m%d%H%M%S").replace(tzinfo=tz)
        if re.fullmatch(r"\d{8}", text):
            d = datetime.strptime(text, "%Y%m%d").replace(tzinfo=ZoneInfo(LOGIN_TZ))
            return d + timedelta(days=1)
    except (ZoneInfoNotFoundError, ValueError):
        pass
    raise RequestError(ib_rules.ERR_INVALID_END, ib_rules.MSG_INVALID_END)


def end_without_zone(text: str) -> bool:
    """Whether an endDateTime relies on an implied zone: IB answers it, with warning 2174
    first (``docs/ib-facts.md`` §2). The UTC form ``YYYYMMDD-HH:MM:SS`` carries its zone."""
    text = text.strip()
    m = _END_FORMS[1].match(text)
    return bool(m and not m.group(5)) or bool(re.fullmatch(r"\d{8}", text))


def check_end_allowed(contract: dict[str, str], end_text: str) -> None:
    """Continuous futures take only an empty end (10339 on TWS/Gateway 10.30+, §2)."""
    if contract.get("secType", "").upper() == "CONTFUT" and end_text.strip():
        raise RequestError(ib_rules.ERR_CONTFUT_END, ib_rules.MSG_CONTFUT_END)


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
    """IB's current longest duration per request (``docs/ib-facts.md`` §2, IB's TWS API
    documentation "max duration per bar size"): ``1 secs`` bars up to 2000 S, every other
    size up to 86400 S / 365 D / 52 W / 12 M / 68 Y. A longer request is answered with
    162 "Historical Market Data Service error message:Time length exceed max." (§2, §3:
    how IB answers it, not 321). The old step-size table (``ib_rules.MAX_DURATION``) is
    no rule here: IB accepts e.g. ``10 D`` of 1-min bars (its own sample asks for it)."""
    if ib_rules.exceeds_max_duration(duration, bar_size):
        raise RequestError(ib_rules.ERR_HMDS, ib_rules.MSG_TIME_LENGTH_EXCEEDED)


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
#: IB's HMDS names of the data types, as its 162 texts quote them ("Last", "MidPoint",
#: "Bid" are seen in real answers; the others are UNVERIFIED spellings).
HMDS_DATA_TYPE = {"TRADES": "Last", "MIDPOINT": "MidPoint", "BID": "Bid", "ASK": "Ask",
                  "BID_ASK": "BidAsk", "ADJUSTED_LAST": "AdjustedLast",
                  "HISTORICAL_VOLATILITY": "HV", "OPTION_IMPLIED_VOLATILITY": "IV"}


def hmds_step(bar_size: str | None) -> str:
    """The bar step as HMDS quotes it: seconds below a day, "1d" for daily bars ("Last 1d"
    in IB's FX TRADES answer), "0" for a head timestamp (no bar size). Weekly and monthly
    spellings are UNVERIFIED."""
    if bar_size is None:
        return "0"
    seconds = ib_rules.BAR_SIZE_SECONDS[bar_size]
    return {86400: "1d", 7 * 86400: "1w", 31 * 86400: "1m"}.get(seconds, str(seconds))


def no_data(inst: Instrument, what: str, bar_size: str | None = None) -> RequestError:
    """IB's 162 when there are no bars: "No historical market data for EUR/CASH@FXSUBPIP
    Last 1d" when the data type does not exist for the instrument (FX TRADES, §2/§3: a bad
    request), else "HMDS query returned no data" (an empty answer)."""
    if not has_bars(inst, what) and inst.sec_type != "OPT":
        venue = "FXSUBPIP" if inst.sec_type == "CASH" else inst.exchange
        return RequestError(ib_rules.ERR_HMDS,
                            f"{ib_rules.MSG_NO_HISTORICAL_DATA_FOR} {inst.symbol}/"
                            f"{inst.sec_type}@{venue} {HMDS_DATA_TYPE.get(what, what)} "
                            f"{hmds_step(bar_size)}")
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


def bars_window(profile: HoursProfile, end: datetime, now: datetime,
                duration: ib_rules.Duration, bar_size: str, use_rth: bool
                ) -> tuple[datetime, datetime]:
    """The span ``[start, end)`` whose bars answer a request, in IB's duration semantics.

    ``start`` is :func:`~ktrdr_pipeline.domain.durations.request_start` of the requested
    end (``docs/ib-facts.md`` §2: ``S`` = trading seconds per useRTH, ``D`` = the sessions
    ending at or before the end, ``W``/``M``/``Y`` = calendar spans in exchange time); the
    answer never reaches past the clock, and small bars reach at most
    :data:`~ktrdr_pipeline.domain.ib_rules.SMALL_BAR_HISTORY` back (§2: IB has no bars of
    30 secs or less older than six months). Daily and larger bars are the sessions whose
    open lies in the span (a daily bar starts at its session's open)."""
    start = request_start(profile, end, duration, use_rth)
    end = min(end, now)
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
