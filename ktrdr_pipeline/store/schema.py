"""What a valid bar frame is: a pandera schema plus the same checks as plain functions.

A bar frame (:mod:`ktrdr_pipeline.domain.bars`) is valid when

- it has exactly the columns open, high, low, close, volume, wap (float64) and bar_count
  (int64), indexed by unique, sorted UTC times ``ts``;
- every ``ts`` is a bar start: daily and larger bars at 00:00 UTC (of a session date);
  intraday bars on a multiple of the bar size from local midnight in the instrument's
  time zone (from the epoch for bars of a minute or less), or at the session open when
  the open is not aligned (1-hour bars of a 09:30 session start at 09:30, 10:00, ...) —
  exactly the bar starts IB (and the simulator's ``MarketModel._labels``) produce;
- prices are positive, ``low <= min(open, close) <= max(open, close) <= high``, and volume,
  WAP and trade count are non-negative (volume and WAP may be NaN: FX has neither).

A bar outside every session of the instrument's calendar profile (regular or all hours, as
requested) is *not* invalid: IB's data is the truth and a calendar may lag behind it (an
unscheduled session, a changed halt). Such a bar is stored like any other (its alignment
is not judged: there is no session whose grid it could be on) and listed by
:func:`outside_session_bars` — the loader counts them, the ``bars_outside_sessions`` asset
check (WARN) lists them.

Bad bars are reported, never "corrected": :func:`validate_bars` raises
:class:`BarValidationError` carrying the offending rows, and :func:`ohlc_violations`,
:func:`duplicate_or_unsorted`, :func:`session_violations` and
:func:`outside_session_bars` return them without raising (for asset checks). Failure
frames are indexed by the offending row's ``ts`` (NaT for a failure that is not about one
row) with a ``check`` column naming the rule and the row's values.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable

import numpy as np
import pandas as pd

try:  # pandera >= 0.24 moved the pandas API to pandera.pandas
    import pandera.pandas as pa
except ImportError:  # pragma: no cover - older pandera
    import pandera as pa  # type: ignore[no-redef]

from ..domain import calendars, grid
from ..domain.bars import BAR_COLUMNS
from ..domain.calendars import HoursProfile
from ..domain.timeframes import Timeframe, get_timeframe

log = logging.getLogger(__name__)

PRICE_COLUMNS = ["open", "high", "low", "close"]
FAILURE_COLUMNS = ["check", *BAR_COLUMNS]

# check names, as they appear in the ``check`` column of failure frames
PRICE_POSITIVE = "price_positive"
OHLC_CONSISTENT = "ohlc_consistent"
VOLUME_NON_NEGATIVE = "volume_non_negative"
WAP_NON_NEGATIVE = "wap_non_negative"
COUNT_NON_NEGATIVE = "bar_count_non_negative"
TS_UTC = "ts_utc"
TS_UNIQUE = "ts_unique"
TS_SORTED = "ts_sorted"
TS_ALIGNED = "ts_aligned"
IN_SESSION = "in_session"

Masks = dict[str, np.ndarray]


class BarValidationError(ValueError):
    """A bar frame breaks the schema; ``failures`` holds the offending rows."""

    def __init__(self, failures: pd.DataFrame, what: str = "bars"):
        self.failures = failures
        counts = failures["check"].value_counts(sort=False)
        summary = ", ".join(f"{name} ({n})" for name, n in counts.items())
        first = ""
        if len(failures):
            ts = failures.index[0]
            where = "" if pd.isna(ts) else f" at {ts.isoformat()}"
            first = f"; first: {failures['check'].iloc[0]}{where}"
        super().__init__(f"{what}: {len(failures)} failure(s): {summary}{first}")


# -- helpers --------------------------------------------------------------------------------
def _timeframe(tf: str | Timeframe) -> Timeframe:
    return tf if isinstance(tf, Timeframe) else get_timeframe(tf)


def _flat(frame: pd.DataFrame) -> pd.DataFrame:
    """The frame with ``ts`` as a column and a positional index, so that every failure
    points at exactly one row even when ``ts`` has duplicates."""
    if "ts" in frame.columns and not isinstance(frame.index, pd.DatetimeIndex):
        flat = frame.reset_index(drop=True)
    else:
        flat = frame.rename_axis("ts").reset_index()
    return flat


def _is_utc(values: pd.Series) -> bool:
    dtype = values.dtype
    return isinstance(dtype, pd.DatetimeTZDtype) and str(dtype.tz) in ("UTC", "UTC+00:00")


def _epoch_ns(values: pd.Series) -> np.ndarray | None:
    """``ts`` as epoch nanoseconds, or None when it is not a tz-aware datetime column."""
    if not isinstance(values.dtype, pd.DatetimeTZDtype):
        return None
    return pd.DatetimeIndex(values).tz_convert("UTC").as_unit("ns").asi8


def _numeric(flat: pd.DataFrame, col: str) -> np.ndarray | None:
    if col not in flat.columns:
        return None
    return pd.to_numeric(flat[col], errors="coerce").to_numpy(dtype="float64", na_value=np.nan)


def _failures(flat: pd.DataFrame, masks: Masks) -> pd.DataFrame:
    """Failure frame of the rows flagged by each mask (check by check, rows in order)."""
    parts = []
    for name, mask in masks.items():
        pos = np.flatnonzero(mask)
        if len(pos):
            parts.append((name, pos))
    return _rows(flat, [(name, p) for name, pos in parts for p in pos])


def _rows(flat: pd.DataFrame, items: list[tuple[str, int | None]]) -> pd.DataFrame:
    """Failure frame from (check, row position or None) pairs."""
    pos = np.array([-1 if p is None else p for _, p in items], dtype=np.int64)
    valid = pos >= 0
    ts = np.full(len(pos), np.iinfo(np.int64).min, dtype=np.int64)  # NaT
    ns = _epoch_ns(flat["ts"]) if "ts" in flat.columns else None
    if ns is not None:
        ts[valid] = ns[pos[valid]]
    data: dict[str, np.ndarray] = {}
    for c in BAR_COLUMNS:
        values = np.full(len(pos), np.nan)
        column = _numeric(flat, c)
        if column is not None:
            values[valid] = column[pos[valid]]
        data[c] = values
    index = pd.DatetimeIndex(ts.view("M8[ns]"), name="ts").tz_localize("UTC")
    return pd.DataFrame({"check": pd.array([name for name, _ in items], dtype=object), **data},
                        index=index, columns=FAILURE_COLUMNS)


# -- the checks as row masks (True = violation) ----------------------------------------------
def _ohlc_masks(flat: pd.DataFrame) -> Masks:
    o, h, lo, c = (_numeric(flat, col) for col in PRICE_COLUMNS)
    n = len(flat)
    masks: Masks = {}
    if o is not None and h is not None and lo is not None and c is not None:
        with np.errstate(invalid="ignore"):
            masks[PRICE_POSITIVE] = ~((o > 0) & (h > 0) & (lo > 0) & (c > 0))
            low_ok = lo <= np.minimum(o, c)
            high_ok = np.maximum(o, c) <= h
            masks[OHLC_CONSISTENT] = ~(low_ok & high_ok) & ~masks[PRICE_POSITIVE]
    for col, name in (("volume", VOLUME_NON_NEGATIVE), ("wap", WAP_NON_NEGATIVE),
                      ("bar_count", COUNT_NON_NEGATIVE)):
        values = _numeric(flat, col)
        if values is not None:
            with np.errstate(invalid="ignore"):
                masks[name] = values < 0
    return {k: v for k, v in masks.items() if len(v) == n}


def _order_masks(flat: pd.DataFrame) -> Masks:
    if "ts" not in flat.columns:
        return {}
    ns = _epoch_ns(flat["ts"])
    if ns is None:
        return {}
    unique = pd.Series(ns).duplicated(keep=False).to_numpy()
    unsorted = np.zeros(len(ns), dtype=bool)
    if len(ns) > 1:
        unsorted[1:] = np.diff(ns) < 0
    return {TS_UNIQUE: unique, TS_SORTED: unsorted}


def _session_masks(flat: pd.DataFrame, tf: Timeframe, profile: HoursProfile,
                   use_rth: bool) -> Masks:
    if "ts" not in flat.columns:
        return {}
    ns = _epoch_ns(flat["ts"])
    if ns is None or len(ns) == 0:
        return {}
    whole = ns % 10**9 == 0
    t = ns // 10**9
    if tf.is_daily_or_larger:
        aligned = whole & (t % 86400 == 0)
        days = (t // 86400).astype("datetime64[D]")
        first = pd.Timestamp(days.min()).date()
        last = pd.Timestamp(days.max()).date()
        found = calendars.sessions_on_dates(profile, first, last, use_rth)
        session_days = np.array([np.datetime64(s.date, "D") for s in found],
                                dtype="datetime64[D]")
        inside = np.isin(days, session_days)
        return {TS_ALIGNED: ~aligned, IN_SESSION: ~inside}
    start = pd.Timestamp(int(t.min()), unit="s", tz="UTC").to_pydatetime()
    end = pd.Timestamp(int(t.max()) + 1, unit="s", tz="UTC").to_pydatetime()
    found = calendars.sessions_between(profile, start, end, use_rth)
    opens = np.array([int(s.open.timestamp()) for s in found], dtype=np.int64)
    closes = np.array([int(s.close.timestamp()) for s in found], dtype=np.int64)
    k = np.searchsorted(opens, t, side="right") - 1
    kk = np.clip(k, 0, max(len(opens) - 1, 0))
    if len(opens):
        inside = (k >= 0) & (t < closes[kk])
        own_open = np.where(inside, opens[kk], -1)  # -1: outside every session, no open
    else:
        inside = np.zeros(len(t), dtype=bool)
        own_open = np.full(len(t), -1, dtype=np.int64)
    size = tf.seconds
    if not grid.counts_from_midnight(size):
        origin = np.zeros(len(t), dtype=np.int64)
    else:
        # inside a session its grid counts from local midnight of its first bar
        own = grid.local_midnights(t, profile.tz)
        sess = grid.local_midnights(opens, profile.tz)[kk] if len(opens) else own
        origin = np.where(inside, sess, own)
    # a bar outside every session is judged only for whole seconds: no session, no grid
    aligned = whole & (grid.on_grid(t, size, own_open, origin) | ~inside)
    return {TS_ALIGNED: ~aligned, IN_SESSION: ~inside}


# -- public, non-raising checks -------------------------------------------------------------
def ohlc_violations(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows with a non-positive (or missing) price, ``low > min(open, close)``,
    ``max(open, close) > high``, or negative volume, WAP or trade count."""
    flat = _flat(frame)
    return _failures(flat, _ohlc_masks(flat))


def duplicate_or_unsorted(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows whose ``ts`` occurs more than once (all of them) or is earlier than the
    previous row's."""
    flat = _flat(frame)
    return _failures(flat, _order_masks(flat))


def session_violations(frame: pd.DataFrame, timeframe: str | Timeframe,
                       profile: str | HoursProfile, use_rth: bool) -> pd.DataFrame:
    """Rows whose ``ts`` is not a bar start of ``timeframe`` in its session
    (``ts_aligned``; a daily or larger bar: not 00:00 UTC). Bars outside every session are
    not violations: see :func:`outside_session_bars`."""
    return _session_rows(frame, timeframe, profile, use_rth, TS_ALIGNED)


def outside_session_bars(frame: pd.DataFrame, timeframe: str | Timeframe,
                         profile: str | HoursProfile, use_rth: bool) -> pd.DataFrame:
    """Rows whose ``ts`` lies outside every session of ``profile`` (``in_session``; a
    daily or larger bar: dated on a day without a session). Not invalid — IB served them
    — but worth a look: the calendar may lag behind IB."""
    return _session_rows(frame, timeframe, profile, use_rth, IN_SESSION)


def _session_rows(frame: pd.DataFrame, timeframe: str | Timeframe,
                  profile: str | HoursProfile, use_rth: bool, check: str) -> pd.DataFrame:
    flat = _flat(frame)
    masks = _session_masks(flat, _timeframe(timeframe), calendars.resolve_profile(profile),
                           use_rth)
    return _failures(flat, {k: v for k, v in masks.items() if k == check})


# -- the pandera schema ---------------------------------------------------------------------
def _memo(masks: Callable[[pd.DataFrame], Masks]) -> Callable[[pd.DataFrame], Masks]:
    """Compute a family of masks once per frame although pandera calls one check each."""
    last: list = [lambda: None, {}]  # a weak reference: never keep the caller's frame alive

    def cached(df: pd.DataFrame) -> Masks:
        if last[0]() is not df:
            last[:] = [weakref.ref(df), masks(df)]
        return last[1]

    return cached


def _frame_check(masks: Callable[[pd.DataFrame], Masks], name: str) -> pa.Check:
    def check(df: pd.DataFrame) -> pd.Series:
        mask = masks(df).get(name)
        ok = np.ones(len(df), dtype=bool) if mask is None else ~mask
        return pd.Series(ok, index=df.index)

    return pa.Check(check, name=name)


def bar_schema(timeframe: str | Timeframe, profile: str | HoursProfile,
               use_rth: bool) -> pa.DataFrameSchema:
    """The pandera schema of a *flat* bar frame (``ts`` as a column, positional index) —
    :func:`validate_bars` flattens the frame first so failures point at single rows."""
    tf, prof = _timeframe(timeframe), calendars.resolve_profile(profile)

    def sessions(df: pd.DataFrame) -> Masks:
        return _session_masks(df, tf, prof, use_rth)

    ohlc, order, sessions = _memo(_ohlc_masks), _memo(_order_masks), _memo(sessions)

    ts_utc = pa.Check(_is_utc, name=TS_UTC)  # no error=: pandera would report it as the name
    columns = {
        "ts": pa.Column(checks=[ts_utc], nullable=False),
        **{c: pa.Column("float64", nullable=False) for c in PRICE_COLUMNS},
        "volume": pa.Column("float64", nullable=True),
        "wap": pa.Column("float64", nullable=True),
        "bar_count": pa.Column("int64", nullable=False),
    }
    checks = [
        *(_frame_check(ohlc, n) for n in (PRICE_POSITIVE, OHLC_CONSISTENT,
                                           VOLUME_NON_NEGATIVE, WAP_NON_NEGATIVE,
                                           COUNT_NON_NEGATIVE)),
        *(_frame_check(order, n) for n in (TS_UNIQUE, TS_SORTED)),
        # in_session is not a rule: bars outside the calendar's sessions are IB's truth
        _frame_check(sessions, TS_ALIGNED),
    ]
    return pa.DataFrameSchema(columns, checks=checks, strict=True, ordered=False,
                              name=f"bars_{tf.name}_{prof.name}_{'rth' if use_rth else 'all'}")


_OWN_CHECKS = frozenset({PRICE_POSITIVE, OHLC_CONSISTENT, VOLUME_NON_NEGATIVE, WAP_NON_NEGATIVE,
                         COUNT_NON_NEGATIVE, TS_UTC, TS_UNIQUE, TS_SORTED, TS_ALIGNED})


def _from_pandera(cases: pd.DataFrame, flat: pd.DataFrame) -> pd.DataFrame:
    """pandera's failure cases (one per failing value, several per row for frame-wide
    checks) as one row per (check, bar), rows in order; failures that are not about one
    row (a missing column, a wrong dtype) first."""
    if len(cases) == 0:
        return _rows(flat, [])
    check = cases["check"].astype(str)
    column = cases["column"] if "column" in cases else pd.Series(None, index=cases.index)
    has_column = column.notna() & (column.astype(str) != "") & ~check.isin(_OWN_CHECKS)
    name = check.where(~has_column, check + "[" + column.astype(str) + "]")
    structural = check.str.startswith(("column_in_schema", "column_in_dataframe"))
    name = name.where(~structural, check.str.replace(r"\[.*", "", regex=True) + "["
                      + cases["failure_case"].astype(str) + "]")
    index = cases["index"] if "index" in cases else pd.Series(None, index=cases.index)
    pos = pd.to_numeric(index, errors="coerce").fillna(-1).astype(np.int64)
    pos = pos.where((pos >= 0) & (pos < len(flat)), -1)
    pairs = pd.DataFrame({"name": name.to_numpy(), "pos": pos.to_numpy()})
    pairs = pairs.drop_duplicates().sort_values("pos", kind="stable")
    return _rows(flat, [(n, None if p < 0 else int(p))
                        for n, p in zip(pairs["name"], pairs["pos"], strict=True)])


def validate_bars(frame: pd.DataFrame, timeframe: str | Timeframe,
                  profile: str | HoursProfile, use_rth: bool) -> None:
    """Raise :class:`BarValidationError` (with every offending row) unless ``frame`` is a
    valid bar frame of ``timeframe`` for an instrument of ``profile``."""
    tf, prof = _timeframe(timeframe), calendars.resolve_profile(profile)
    flat = _flat(frame)
    schema = bar_schema(tf, prof, use_rth)
    try:
        schema.validate(flat, lazy=True)
    except pa.errors.SchemaErrors as exc:
        failures = _from_pandera(exc.failure_cases, flat)
        if len(failures) == 0:  # pragma: no cover - pandera reported nothing row-like
            failures = _rows(flat, [("schema", None)])
        raise BarValidationError(failures, f"{tf.name} bars ({prof.name}, "
                                           f"{'RTH' if use_rth else 'all hours'})") from None
    except pa.errors.SchemaError as exc:  # pragma: no cover - lazy=True collects errors
        raise BarValidationError(_rows(flat, [(str(exc), None)])) from None
