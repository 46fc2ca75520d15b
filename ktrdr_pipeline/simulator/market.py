"""Deterministic synthetic market data for the simulator.

The model is generated top-down so every bar size agrees exactly:

1. **Session levels.** Per instrument, one random walk of session closes over the whole
   schedule (seeded by ``seed`` and the contract id), anchored so the close at
   :data:`~ktrdr_pipeline.simulator.universe.REFERENCE_DATE` is the instrument's base price.
2. **Minute bars.** Per session, a Brownian bridge from the session's open level to its
   close level gives every minute's open/high/low/close, volume, trade count and WAP over
   the instrument's *all-hours* session. Regular-hours data is the subset of those minutes.
3. **Second bars** are generated on demand inside one minute, conditioned on that minute:
   their first open, last close, highest high, lowest low, total volume and trade count
   equal the minute's exactly.

Bars of one minute and longer aggregate minute bars; bars under a minute aggregate second
bars. So a 1-hour bar equals the aggregate of its 1-minute bars, and overlapping requests
return identical bars.

**Trades only.** As with IB, TRADES bars exist only where something traded: a minute (or
second) without volume yields no TRADES bar, while quote-based data (MIDPOINT, BID, ASK)
has every bar. Liquid instruments trade every second; a thin one (the default universe's
``ILLQ``) leaves holes that a loader must not mistake for missing data. Inside a minute the
price stays at the minute's open until its first trade and at its close after its last, and
its high and low fall on traded seconds, so trades-only bars of every size still aggregate
exactly. Only the bar in progress (at the simulator's clock) is partial: it
aggregates the seconds completed so far and converges to the final bar as time passes.

**Off-calendar trading.** A fault (:class:`~ktrdr_pipeline.simulator.faults.OffCalendarTrading`)
can make an instrument trade minutes outside its calendar's sessions, as IB does when the
calendar lags behind it: those minutes trade flat at the previous session's close and are
served as bars of a minute and longer (below a day) on the usual grid, counted from their
own first minute.

Each session and each minute has its own random stream, so generation is lazy and costs
well under a millisecond per session; caches are bounded LRUs so memory stays flat.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import numpy as np

from ..domain import calendars, grid
from ..domain.ib_rules import BAR_SIZE_SECONDS, DAILY_BAR_SECONDS
from .faults import OffCalendarTrading
from .universe import REFERENCE_DATE, Instrument

# Column order of a bar block: start epoch, open, high, low, close, volume, trade count, WAP.
T, O, H, L, C, V, N, W = range(8)  # noqa: E741


class LRU:
    """A small bounded mapping; old entries fall out so memory stays flat."""

    def __init__(self, maxsize: int):
        self.maxsize = maxsize
        self._data: OrderedDict = OrderedDict()

    def get(self, key):
        try:
            self._data.move_to_end(key)
            return self._data[key]
        except KeyError:
            return None

    def put(self, key, value) -> None:
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self.maxsize:
            self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)


def _round_tick(x: np.ndarray, tick: float) -> np.ndarray:
    return np.round(np.round(x / tick) * tick, 10)


class MarketModel:
    """Synthetic prices for every instrument of a universe, deterministic per seed."""

    def __init__(self, seed: int = 0):
        self.seed = int(seed)
        self._levels: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._minutes = LRU(256)
        self._daily = LRU(200_000)
        self.off_calendar = OffCalendarTrading()

    # -- levels -----------------------------------------------------------------------
    def _session_levels(self, inst: Instrument) -> tuple[np.ndarray, np.ndarray]:
        """Log open and close level of every session in the instrument's schedule."""
        cached = self._levels.get(inst.con_id)
        if cached is not None:
            return cached
        sch = calendars.schedule(inst.profile.name)
        n = len(sch.dates)
        rng = np.random.default_rng([self.seed, inst.con_id, 0])
        sigma_d = inst.annual_vol / math.sqrt(252)
        day_ret = rng.normal(0.0, sigma_d, n)
        gaps = rng.normal(0.0, sigma_d * 0.15, n)
        log_close = np.cumsum(day_ret)
        ref = int(np.searchsorted(sch.dates, np.datetime64(REFERENCE_DATE, "D")))
        ref = min(ref, n - 1)
        log_close += math.log(inst.base_price) - log_close[ref]
        log_open = np.empty(n)
        log_open[0] = log_close[0] - day_ret[0] + gaps[0]
        log_open[1:] = log_close[:-1] + gaps[1:]
        self._levels[inst.con_id] = (log_open, log_close)
        return log_open, log_close

    # -- minutes ----------------------------------------------------------------------
    def session_minutes(self, inst: Instrument, idx: int) -> np.ndarray:
        """All-hours minute bars of session ``idx``: an (n, 8) float array."""
        key = (inst.con_id, idx)
        block = self._minutes.get(key)
        if block is not None:
            return block
        sch = calendars.schedule(inst.profile.name)
        start, end = int(sch.all_open[idx]), int(sch.all_close[idx])
        n = max(0, (end - start) // 60)
        log_open, log_close = self._session_levels(inst)
        rng = np.random.default_rng([self.seed, inst.con_id, 1, idx])
        k = np.arange(1, n + 1)
        walk = np.cumsum(rng.normal(0.0, 1.0, n))
        bridge = walk - (k / n) * walk[-1]
        sigma_m = 0.8 * inst.annual_vol / math.sqrt(252) / math.sqrt(max(n, 1))
        lo_, lc_ = log_open[idx], log_close[idx]
        path = lo_ + (lc_ - lo_) * (k / n) + sigma_m * bridge
        tick = inst.tick
        closes = _round_tick(np.exp(path), tick)
        opens = np.empty(n)
        opens[0] = _round_tick(np.array([math.exp(lo_)]), tick)[0]
        opens[1:] = closes[:-1]
        px = np.maximum(opens, closes)
        wick = np.abs(rng.normal(0.0, sigma_m * 0.6, (2, n))) * px
        highs = _round_tick(np.maximum(opens, closes) + wick[0], tick)
        lows = np.maximum(_round_tick(np.minimum(opens, closes) - wick[1], tick), tick)
        lows = np.minimum(lows, np.minimum(opens, closes))
        # Volume is U-shaped over the session and thin outside regular hours.
        t = start + 60 * (k - 1)
        frac = (k - 0.5) / n
        shape = 0.6 + 1.6 * (frac - 0.5) ** 2 * 4 / 4
        if inst.sec_type == "STK":
            rth = (t >= sch.rth_open[idx]) & (t < sch.rth_close[idx])
            shape = np.where(rth, shape, 0.05)
        volume = rng.poisson(np.maximum(inst.volume_per_minute * shape, 0.0)).astype(float)
        counts = np.where(volume > 0, np.ceil(volume / max(inst.trade_size, 1)), 0.0)
        wap = np.round((highs + lows + closes) / 3.0, 6)
        block = np.column_stack([t.astype(float), opens, highs, lows, closes, volume, counts, wap])
        block.setflags(write=False)
        self._minutes.put(key, block)
        return block

    def minute_seconds(self, inst: Instrument, idx: int, minute: np.ndarray) -> np.ndarray:
        """The 60 one-second bars of one minute bar, conditioned on it exactly."""
        t0 = int(minute[T])
        rng = np.random.default_rng([self.seed, inst.con_id, 2, idx, t0])
        o, h, lo, c, v, n = (minute[O], minute[H], minute[L], minute[C], int(minute[V]),
                             int(minute[N]))
        tick = inst.tick
        steps = rng.normal(0.0, 1.0, 60)
        if v > 0:
            sv = rng.multinomial(v, np.full(60, 1 / 60)).astype(float)
            sn = rng.multinomial(n, sv / v).astype(float) if n > 0 else np.zeros(60)
        else:
            sv, sn = np.zeros(60), np.zeros(60)
        walk = np.concatenate([[0.0], np.cumsum(steps)])
        bridge = walk - np.linspace(0, 1, 61) * walk[-1]
        scale = max(h - lo, tick) / 4.0
        x = o + (c - o) * np.linspace(0, 1, 61) + scale * bridge
        x = np.clip(_round_tick(x, tick), lo, h)
        # extremes belong to traded seconds (all of them when nothing traded)
        traded = np.flatnonzero(sv > 0) if v > 0 else np.arange(60)
        x[:traded[0] + 1] = o  # no trade yet: still at the open
        x[traded[-1] + 1:] = c  # no more trades: already at the close
        so, sc = x[:-1], x[1:]
        sh, sl = np.maximum(so, sc), np.minimum(so, sc)
        sh[traded[int(np.argmax(sh[traded]))]] = h
        sl[traded[int(np.argmin(sl[traded]))]] = lo
        sw = (sh + sl + sc) / 3.0
        # shift the seconds' WAPs so that their volume-weighted mean is the minute's WAP
        sw = sw + ((minute[W] * v - float(np.dot(sw, sv))) / v if v > 0 else minute[W] - sw)
        ts = t0 + np.arange(60, dtype=float)
        return np.column_stack([ts, so, sh, sl, sc, sv, sn, sw])

    # -- aggregation --------------------------------------------------------------------
    @staticmethod
    def aggregate(block: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Reduce consecutive rows sharing a label into one bar labelled by it."""
        if len(block) == 0:
            return block.reshape(0, 8)
        starts = np.flatnonzero(np.r_[True, labels[1:] != labels[:-1]])
        ends = np.r_[starts[1:], len(block)] - 1
        out = np.empty((len(starts), 8))
        out[:, T] = labels[starts]
        out[:, O] = block[starts, O]
        out[:, H] = np.maximum.reduceat(block[:, H], starts)
        out[:, L] = np.minimum.reduceat(block[:, L], starts)
        out[:, C] = block[ends, C]
        out[:, V] = np.add.reduceat(block[:, V], starts)
        out[:, N] = np.add.reduceat(block[:, N], starts)
        pv = np.add.reduceat(block[:, W] * block[:, V], starts)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[:, W] = np.where(out[:, V] > 0, pv / np.where(out[:, V] > 0, out[:, V], 1),
                                 out[:, C])
        return out

    def _session_rows(self, inst: Instrument, idx: int, use_rth: bool, now: float,
                      seconds: bool, window: tuple[float, float] | None = None,
                      trades: bool = False) -> np.ndarray:
        """Minute (or second) rows of one session up to ``now``, the last one partial.

        ``window`` limits the rows to the minutes overlapping [start, end) (second bars are
        generated only where they are asked for); ``trades`` keeps only rows with volume."""
        sch = calendars.schedule(inst.profile.name)
        minutes = self.session_minutes(inst, idx)
        lo, hi = sch.bounds(use_rth)
        t = minutes[:, T]
        keep = (t >= lo[idx]) & (t < hi[idx]) & (t < now)
        if window is not None:
            keep &= (t + 60 > window[0]) & (t < window[1])
        if trades:
            keep &= minutes[:, V] > 0
        rows = minutes[keep]
        if len(rows) == 0:
            return rows
        last = rows[-1]
        if last[T] + 60 <= now and not seconds:
            return rows
        if seconds:
            blocks = [self.minute_seconds(inst, idx, m) for m in rows]
            secs = np.concatenate(blocks)
            secs = secs[secs[:, T] < now]
            return secs[secs[:, V] > 0] if trades else secs
        partial = self.minute_seconds(inst, idx, last)
        partial = partial[partial[:, T] < now]
        if trades:
            partial = partial[partial[:, V] > 0]
        if len(partial) == 0:  # the minute in progress has not traded yet
            return rows[:-1]
        agg = self.aggregate(partial, np.full(len(partial), last[T]))
        return np.concatenate([rows[:-1], agg])

    def daily_row(self, inst: Instrument, idx: int, use_rth: bool, now: float,
                  trades: bool = False) -> np.ndarray | None:
        """The aggregate of one session (None when it has no bars before ``now``)."""
        sch = calendars.schedule(inst.profile.name)
        complete = sch.all_close[idx] <= now
        key = (inst.con_id, idx, use_rth, trades)
        if complete:
            row = self._daily.get(key)
            if row is not None:
                return row
        rows = self._session_rows(inst, idx, use_rth, now, seconds=False, trades=trades)
        if len(rows) == 0:
            return None
        row = self.aggregate(rows, np.zeros(len(rows)))[0]
        if complete:
            self._daily.put(key, row)
        return row

    # -- the public query -------------------------------------------------------------
    @staticmethod
    def head_time(inst: Instrument, use_rth: bool) -> datetime:
        """The first bar's time: the open of the first session on or after the listing
        (head) date."""
        first = inst.head.date()
        found = calendars.sessions_on_dates(inst.profile, first, first + timedelta(days=10),
                                            use_rth)
        return found[0].open if found else inst.head

    def bars(self, inst: Instrument, bar_size: str, start: datetime, end: datetime,
             use_rth: bool, now: datetime, trades: bool = False) -> np.ndarray:
        """Bars whose start lies in [start, end), up to ``now`` (the last may be partial).

        Returns an (n, 8) array; for daily and larger bars column T holds the epoch of the
        session date at 00:00 UTC, and a session's bar counts as starting at its open (per
        ``use_rth``): the sessions whose open lies in [start, end). Data exists only from
        the instrument's head timestamp and, for futures, up to the expiry's session.
        ``trades``: only bars in which something traded (IB's TRADES data); otherwise every
        bar (quote-based data).
        """
        size = BAR_SIZE_SECONDS[bar_size]
        profile = inst.profile
        now_s = now.timestamp()
        s = max(start, self.head_time(inst, use_rth))
        e = min(end, now + timedelta(seconds=1))
        expiry = inst.expiry_date
        if expiry is not None and inst.sec_type == "FUT":
            e = min(e, datetime(expiry.year, expiry.month, expiry.day, tzinfo=UTC)
                    + timedelta(days=1))
        if s >= e:
            return np.empty((0, 8))
        sch = calendars.schedule(profile.name)
        if size >= DAILY_BAR_SECONDS:
            return self._daily_bars(inst, bar_size, s, e, use_rth, now_s, trades)
        i, j = calendars.session_index_range(profile, s, e, use_rth)
        tz = ZoneInfo(profile.tz)
        out = ([self._off_calendar_bars(inst, size, s, e, now_s, tz, trades)] if size >= 60
               else [])
        for idx in range(i, j):
            small = size < 60
            window = (s.timestamp(), e.timestamp()) if small else None
            rows = self._session_rows(inst, idx, use_rth, now_s, seconds=small, window=window,
                                      trades=trades)
            if len(rows) == 0:
                continue
            lo = sch.bounds(use_rth)[0][idx]
            labels = self._labels(rows[:, T], size, lo, tz)
            bars = self.aggregate(rows, labels)
            out.append(bars)
        allbars = np.concatenate(out) if out else np.empty((0, 8))
        allbars = allbars[np.argsort(allbars[:, T], kind="stable")]
        keep = (allbars[:, T] >= s.timestamp()) & (allbars[:, T] < e.timestamp())
        return allbars[keep]

    @staticmethod
    def instrument_names(inst: Instrument) -> list[str]:
        """The names a fault may give ``inst`` by (see :class:`OffCalendarTrading`)."""
        names = [inst.symbol, inst.local_symbol, str(inst.con_id)]
        if inst.sec_type == "CASH":
            names.append(inst.symbol + inst.currency)
        return names

    def _off_calendar_bars(self, inst: Instrument, size: int, s: datetime, e: datetime,
                           now_s: float, tz: ZoneInfo, trades: bool) -> np.ndarray:
        """Bars of the injected minutes outside every (all-hours) session in [s, e)."""
        spans = self.off_calendar.spans_for(self.instrument_names(inst))
        if not spans:
            return np.empty((0, 8))
        t = np.unique(np.concatenate([np.arange(a, b, 60, dtype=np.int64) for a, b in spans]))
        t = t[(t + 60 > s.timestamp()) & (t < e.timestamp()) & (t < now_s)]
        t = t[calendars.outside_sessions(inst.profile, t, False)]
        if len(t) == 0:
            return np.empty((0, 8))
        sch = calendars.schedule(inst.profile.name)
        _, log_close = self._session_levels(inst)
        before = np.maximum(np.searchsorted(sch.all_close, t, side="right") - 1, 0)
        price = _round_tick(np.exp(log_close[before]), inst.tick)
        volume = np.full(len(t), float(max(round(inst.volume_per_minute * 0.05), 0)))
        counts = np.where(volume > 0, np.ceil(volume / max(inst.trade_size, 1)), 0.0)
        block = np.column_stack([t.astype(float), price, price, price, price, volume, counts,
                                 price])
        if trades and not volume[0]:  # nothing traded (FX has no volume): no TRADES bar
            return np.empty((0, 8))
        # each run of consecutive minutes is a session of its own for the bar grid
        run = np.cumsum(np.r_[True, np.diff(t) != 60])
        labels = np.empty(len(t))
        for k in np.unique(run):
            sel = run == k
            labels[sel] = self._labels(t[sel].astype(float), size, int(t[sel][0]), tz)
        return self.aggregate(block, labels)

    @staticmethod
    def _labels(t: np.ndarray, size: int, session_open: int, tz: ZoneInfo) -> np.ndarray:
        """Bar start for each row, on the bar grid (:mod:`ktrdr_pipeline.domain.grid`)."""
        origin = grid.grid_origin(int(t[0]), size, tz)
        return grid.bar_starts(t.astype(np.int64), size, session_open, origin).astype(float)

    def _daily_bars(self, inst: Instrument, bar_size: str, s: datetime, e: datetime,
                    use_rth: bool, now_s: float, trades: bool = False) -> np.ndarray:
        sch = calendars.schedule(inst.profile.name)
        # A daily bar starts at its session's open (docs/ib-facts.md §2, domain/durations):
        # the sessions whose open (per useRTH) lies in [s, e).
        opens = sch.bounds(use_rth)[0]
        i = int(np.searchsorted(opens, int(s.timestamp()), side="left"))
        j = int(np.searchsorted(opens, int(e.timestamp()), side="left"))
        rows, days = [], []
        for idx in range(i, j):
            row = self.daily_row(inst, idx, use_rth, now_s, trades)
            if row is None:
                continue
            rows.append(row)
            days.append(sch.dates[idx])
        if not rows:
            return np.empty((0, 8))
        block = np.array(rows)
        day_arr = np.array(days, dtype="datetime64[D]")
        block[:, T] = grid.daily_key(day_arr)
        if bar_size == "1 day":
            return block
        labels = grid.period_start(day_arr, bar_size).astype("datetime64[s]").astype(
            np.int64).astype(float)
        agg = self.aggregate(block, labels)
        agg[:, T] = block[grid.first_of_each_period(day_arr, bar_size), T]
        return agg

    # -- prices for snapshots ----------------------------------------------------------
    def last_price(self, inst: Instrument, now: datetime) -> float:
        """The last traded price at ``now`` (the previous close when the market is shut)."""
        profile = inst.profile
        look_back = now - timedelta(days=10)
        bars = self.bars(inst, "1 min", look_back, now + timedelta(minutes=1), False, now,
                         trades=inst.sec_type != "CASH")
        if len(bars):
            return float(bars[-1, C])
        _, log_close = self._session_levels(inst)
        i, _ = calendars.session_index_range(profile, now, now + timedelta(seconds=1), False)
        return float(math.exp(log_close[max(i - 1, 0)]))
