"""IB's rules in one place: bar sizes, request durations, pacing limits, error codes.

Both the client side (planner, pacing governor, fetcher) and the gateway simulator read
these facts from here, so the two can never disagree. Source: ``docs/ib-facts.md``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta

# --- bar sizes ---------------------------------------------------------------------------

#: Every bar size string IB accepts, mapped to the bar's length in seconds.
#: ``1 month`` is calendar-based; its nominal 31 days is only used for ordering.
BAR_SIZE_SECONDS: dict[str, int] = {
    "1 secs": 1,
    "5 secs": 5,
    "10 secs": 10,
    "15 secs": 15,
    "30 secs": 30,
    "1 min": 60,
    "2 mins": 120,
    "3 mins": 180,
    "5 mins": 300,
    "10 mins": 600,
    "15 mins": 900,
    "20 mins": 1200,
    "30 mins": 1800,
    "1 hour": 3600,
    "2 hours": 7200,
    "3 hours": 10800,
    "4 hours": 14400,
    "8 hours": 28800,
    "1 day": 86400,
    "1 week": 7 * 86400,
    "1 month": 31 * 86400,
}

#: Bars of this length or shorter fall under the hard pacing rules and the 6-month limit.
SMALL_BAR_MAX_SECONDS = 30

#: Bars at or above this size are keyed by session date, not by time.
DAILY_BAR_SECONDS = 86400

#: IB keeps bars of 30 secs or less for about six months.
SMALL_BAR_HISTORY = timedelta(days=182)


def is_small_bar(bar_size: str) -> bool:
    """True for bar sizes under the hard pacing rules (30 secs or less)."""
    return BAR_SIZE_SECONDS[bar_size] <= SMALL_BAR_MAX_SECONDS


def is_daily_or_larger(bar_size: str) -> bool:
    return BAR_SIZE_SECONDS[bar_size] >= DAILY_BAR_SECONDS


#: The whatToShow value that counts twice in the pacing rules.
BID_ASK = "BID_ASK"

#: Every whatToShow value this project requests (``docs/ib-facts.md`` §2).
WHAT_TO_SHOW: tuple[str, ...] = (
    "TRADES",
    "MIDPOINT",
    "BID",
    "ASK",
    "BID_ASK",
    "ADJUSTED_LAST",
    "HISTORICAL_VOLATILITY",
    "OPTION_IMPLIED_VOLATILITY",
)


# --- durations ---------------------------------------------------------------------------

_DURATION_RE = re.compile(r"^(\d+) ([SDWMY])$")

#: Seconds per duration unit. Months and years take their longest calendar length so a
#: request of ``1 M`` covers any calendar month and ``1 Y`` any year.
DURATION_UNIT_SECONDS = {"S": 1, "D": 86400, "W": 7 * 86400, "M": 31 * 86400, "Y": 366 * 86400}


class DurationError(ValueError):
    """A duration string IB would reject with error 321."""


@dataclass(frozen=True)
class Duration:
    count: int
    unit: str

    def __str__(self) -> str:
        return f"{self.count} {self.unit}"

    @property
    def span(self) -> timedelta:
        return timedelta(seconds=self.count * DURATION_UNIT_SECONDS[self.unit])


def parse_duration(text: str) -> Duration:
    """Parse ``'<n> S|D|W|M|Y'`` as IB does, including its unit-size rules."""
    m = _DURATION_RE.match(text.strip())
    if not m:
        raise DurationError(
            f"Invalid duration {text!r}: expected '<integer> <unit>' with unit S, D, W, M or Y"
        )
    count, unit = int(m.group(1)), m.group(2)
    if count <= 0:
        raise DurationError(f"Invalid duration {text!r}: the count must be positive")
    if unit == "S" and count > 86400:
        raise DurationError(f"Invalid duration {text!r}: durations over 86400 S must be in days")
    if unit == "D" and count > 365:
        raise DurationError(f"Invalid duration {text!r}: durations over 365 D must be in years")
    return Duration(count, unit)


#: IB's current longest duration per request (``docs/ib-facts.md`` §2, IB's TWS API
#: documentation "Historical Bar Data: max duration per bar size"): every bar size from
#: 5 secs up accepts up to these counts of each unit (``parse_duration`` already refuses
#: over 86400 S and over 365 D with 321); ``1 secs`` bars accept at most 2000 S.
MAX_DURATION_COUNT: dict[str, int] = {"S": 86400, "D": 365, "W": 52, "M": 12, "Y": 68}
ONE_SECOND_BARS_MAX_S = 2000


def exceeds_max_duration(duration: Duration, bar_size: str) -> bool:
    """Whether IB answers this duration for this bar size with 162 "Time length exceed
    max." (§2: how IB answers a too-long request, not 321)."""
    if BAR_SIZE_SECONDS[bar_size] == 1:
        return duration.unit != "S" or duration.count > ONE_SECOND_BARS_MAX_S
    return duration.count > MAX_DURATION_COUNT[duration.unit]


# --- pacing ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PacingLimits:
    """The hard pacing rules for small bars and head-timestamp requests (§1).

    ``time_scale`` shrinks every window (tests and benchmarks only); counts stay the same.
    """

    time_scale: float = 1.0
    identical_window_s: float = 15.0
    same_contract_window_s: float = 2.0
    same_contract_max: int = 5  # "fewer than 6 within 2 s"
    global_window_s: float = 600.0
    global_max: int = 60
    bid_ask_weight: int = 2

    @property
    def identical_window(self) -> float:
        return self.identical_window_s * self.time_scale

    @property
    def same_contract_window(self) -> float:
        return self.same_contract_window_s * self.time_scale

    @property
    def global_window(self) -> float:
        return self.global_window_s * self.time_scale


#: At most this many historical requests (any bar size, head timestamps included) open.
MAX_OPEN_HISTORICAL_REQUESTS = 50

# --- error codes -------------------------------------------------------------------------

HMDS_PREFIX = "Historical Market Data Service error message:"
ERR_HMDS = 162
ERR_NO_SECURITY = 200
ERR_VALIDATION = 321
ERR_PROCESSING = 322
ERR_CLIENT_ID_IN_USE = 326
ERR_NOT_SUBSCRIBED = 354
ERR_NO_QUERY = 366
ERR_CONNECTIVITY_LOST = 1100
ERR_RESTORED_DATA_LOST = 1101
ERR_RESTORED_DATA_MAINTAINED = 1102
#: Farm status notices (connection OK / inactive but available): not errors.
INFO_CODES = frozenset({2104, 2106, 2107, 2108, 2119, 2158})

MSG_PACING_VIOLATION = HMDS_PREFIX + "Historical data request pacing violation"
MSG_NO_DATA = HMDS_PREFIX + "HMDS query returned no data"
MSG_QUERY_CANCELLED = HMDS_PREFIX + "API historical data query cancelled"
MSG_NO_SECURITY = "No security definition has been found for the request"
MSG_AMBIGUOUS = "The contract description specified is ambiguous"
MSG_CLIENT_ID_IN_USE = (
    "Unable to connect as the client id is already in use. Retry with a unique client id."
)
MSG_TOO_MANY_OPEN = (
    "Error processing request.-'bA' : cause - Only 50 simultaneous API historical data "
    "requests allowed."
)
MSG_PROCESSING = "Error processing request.-'bA' : cause - Historical data request failed"
MSG_CONNECTIVITY_LOST = "Connectivity between IB and Trader Workstation has been lost."
MSG_RESTORED_DATA_MAINTAINED = (
    "Connectivity between IB and Trader Workstation has been restored - data maintained."
)

#: Error codes a loader retries with backoff (pacing is a 162 recognised by its text).
RETRYABLE_CODES = frozenset({ERR_PROCESSING, ERR_NO_QUERY, 502, 504, 1100, 2103, 2105})

# --- historical-data errors and warnings as IB words them (docs/ib-facts.md §2, §3) -------
#: 162's texts after :data:`HMDS_PREFIX`, from real gateways' logs. A non-English TWS
#: translates the prefix (e.g. "Mensaje de error de los servicios de datos de mercado
#: históricos:invalid step: 1", wrighter/ib-scripts#1) and may translate more, so a client
#: matches only their stable parts (``ktrdr_pipeline.ib.errors``).
MSG_TIME_LENGTH_EXCEEDED = HMDS_PREFIX + "Time length exceed max."
#: "…No historical market data for EUR/CASH@FXSUBPIP Last 1d": the data type does not exist
#: for the instrument (FX TRADES). The tail names symbol/secType@venue, IB's name of the data
#: type and the bar step ("1d" daily, seconds below a day, "0" for a head timestamp; e.g.
#: "CAC40/IND@MONEP Bid 1800", "SPX/IND@CBOE MidPoint 60" in public client code).
MSG_NO_HISTORICAL_DATA_FOR = HMDS_PREFIX + "No historical market data for"
MSG_NO_PERMISSIONS = HMDS_PREFIX + "No market data permissions for"

#: A malformed endDateTime (IB's text as logged in atreyuxtrading/atreyu-backtrader-api#6
#: and ultra1971/backtrader_ib_insync#6).
ERR_INVALID_END = 10314
MSG_INVALID_END = (
    "End Date/Time: The date, time, or time-zone entered is invalid. The correct format is "
    "yyyymmdd hh:mm:ss xx/xxxx where yyyymmdd and xx/xxxx are optional. E.g.: 20031126 "
    "15:59:00 US/Eastern  Note that there is a space between the date and time, and between "
    "the time and time-zone.  If no date is specified, current date is assumed. If no "
    "time-zone is specified, local time-zone is assumed(deprecated).  You can also provide "
    "yyyymmddd-hh:mm:ss time is in UTC. Note that there is a dash between the date and time "
    "in UTC notation."
)
#: An end date for a continuous future (TWS/Gateway 10.30+; nautilus_trader#2616).
ERR_CONTFUT_END = 10339
MSG_CONTFUT_END = "Setting end date/time for continuous future security type is not allowed."
#: A warning, sent before the data, for an end time without a zone (TWS 10.17+; the text
#: as logged in OpenTWS/opentws-dotnet#42 and maxicus/ib-tws-api#29; a Chinese TWS sends
#: it translated, vnpy/vnpy_ib#12).
WARN_END_WITHOUT_ZONE = 2174
MSG_END_WITHOUT_ZONE = (
    "Warning: You submitted request with date-time attributes without explicit time zone. "
    "Please switch to use yyyymmdd-hh:mm:ss in UTC or use instrument time zone, like "
    "US/Eastern. Implied time zone functionality will be removed in the next API release"
)

#: Which whatToShow values have bars, per security type (§2 "whatToShow by product").
WHAT_TO_SHOW_BY_SEC_TYPE: dict[str, tuple[str, ...]] = {
    "STK": WHAT_TO_SHOW,
    "ETF": WHAT_TO_SHOW,
    "IND": ("TRADES", "MIDPOINT", "BID", "ASK", "BID_ASK", "HISTORICAL_VOLATILITY",
            "OPTION_IMPLIED_VOLATILITY"),
    "FUT": ("TRADES", "MIDPOINT", "BID", "ASK", "BID_ASK"),
    "CONTFUT": ("TRADES", "MIDPOINT", "BID", "ASK", "BID_ASK"),
    "OPT": ("TRADES", "MIDPOINT", "BID", "ASK", "BID_ASK"),
    "BOND": ("TRADES", "MIDPOINT", "BID", "ASK", "BID_ASK"),
    "WAR": ("TRADES", "MIDPOINT", "BID", "ASK", "BID_ASK"),
    "CASH": ("MIDPOINT", "BID", "ASK", "BID_ASK"),
    "CFD": ("MIDPOINT", "BID", "ASK", "BID_ASK"),
    "CRYPTO": ("MIDPOINT", "BID", "ASK", "BID_ASK"),
    "CMDTY": ("MIDPOINT", "BID", "ASK", "BID_ASK"),
}


def what_to_show_for(sec_type: str) -> tuple[str, ...]:
    """The whatToShow values IB keeps bars of for ``sec_type`` (all, if unknown)."""
    return WHAT_TO_SHOW_BY_SEC_TYPE.get(sec_type.upper(), WHAT_TO_SHOW)
