"""Running a request plan against IB: pacing, concurrency, timeouts, retries, sizing.

The fetcher never mistakes a failure for "no data": a timeout cancels the request, a
pacing violation backs off and retries, a disconnect reconnects and re-issues; only IB's
explicit "HMDS query returned no data" is an empty success. Errors that retrying cannot
fix (unknown contract, invalid request, permissions) fail at once.

**Sizing.** The planner packs as many bars into a request as the budget allows
(:mod:`ktrdr_pipeline.domain.planning`); at IB a big answer's cost is its service time
against the client's timeout (docs/ib-facts.md §2: ``6 D`` of 1-min bars timed out at
60 s on a busy day, ib_insync #268). So the fetcher adapts within one fetch: an answer
that took more than ``slow_fraction`` of the timeout lowers the budget for the requests
not yet sent to what would take ``target_fraction`` of it at the observed speed (they are
re-planned with :func:`~ktrdr_pipeline.domain.planning.split_request`); a request that
timed out is split in two (about half its sessions each) and the halves are sent instead,
never the same request again, down to one session (small bars: a few minutes' bars);
only that one is retried, up to ``attempts`` times, and then fails.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime

import pandas as pd
from ib_async import BarDataList, Contract
from ib_async.wrapper import RequestError

from ..domain import ib_rules
from ..domain.bars import empty_bars
from ..domain.pacing import bars_pacing_key
from ..domain.planning import (
    DEFAULT_MAX_BARS_PER_REQUEST,
    HistoricalRequest,
    can_split,
    split_request,
)
from .connection import IBConnection
from .errors import Disconnected, ErrorKind, IBError, RequestTimeout
from .governor import PacingGovernor

log = logging.getLogger(__name__)

#: whatToShow per security type when the caller does not choose (FX has no TRADES).
DEFAULT_WHAT_TO_SHOW = {"STK": "TRADES", "FUT": "TRADES", "IND": "TRADES", "OPT": "TRADES",
                        "CASH": "MIDPOINT", "CMDTY": "MIDPOINT", "CRYPTO": "MIDPOINT"}


def default_what_to_show(sec_type: str) -> str:
    return DEFAULT_WHAT_TO_SHOW.get(sec_type.upper(), "TRADES")


def bars_to_frame(bars: Iterable) -> pd.DataFrame:
    """IB bars as a frame indexed by UTC bar start (daily and larger: session date 00:00
    UTC); IB's -1 for "no volume" becomes NaN."""
    rows = list(bars)
    if not rows:
        return empty_bars()
    ts = []
    for b in rows:
        d = b.date
        if isinstance(d, datetime):
            ts.append(d.astimezone(UTC) if d.tzinfo else d.replace(tzinfo=UTC))
        elif isinstance(d, date):
            ts.append(datetime(d.year, d.month, d.day, tzinfo=UTC))
        else:
            raise ValueError(f"unexpected bar date {d!r}")
    frame = pd.DataFrame({
        "open": [b.open for b in rows], "high": [b.high for b in rows],
        "low": [b.low for b in rows], "close": [b.close for b in rows],
        "volume": [b.volume for b in rows], "wap": [b.average for b in rows],
        "bar_count": [b.barCount for b in rows],
    }, index=pd.DatetimeIndex(ts, name="ts").as_unit("ns"))
    frame.loc[frame["volume"] < 0, "volume"] = float("nan")
    frame.loc[frame["wap"] < 0, "wap"] = float("nan")
    frame["bar_count"] = frame["bar_count"].clip(lower=0).astype("int64")
    return frame


@dataclass
class FetchResult:
    frame: pd.DataFrame
    requests_made: int = 0
    requests_planned: int = 0
    retries: int = 0
    empty_answers: int = 0
    pacing_violations: int = 0
    #: IB's own words for each empty answer ("HMDS query returned no data: …").
    no_data_reasons: list[str] = field(default_factory=list)
    #: requests split after a timeout, and the budget in force at the end of the fetch
    splits: int = 0
    max_bars: int | None = None


class HistoricalFetcher:
    """Runs :func:`~ktrdr_pipeline.domain.planning.plan_requests` plans through one connection."""

    def __init__(self, connection: IBConnection, governor: PacingGovernor, *,
                 timeout_s: float = 120.0, attempts: int = 3, backoff_s: float = 1.0,
                 max_concurrency: int = 4, max_pacing_retries: int = 10,
                 max_bars: int = DEFAULT_MAX_BARS_PER_REQUEST, slow_fraction: float = 0.5,
                 target_fraction: float = 0.25):
        if not 0 < target_fraction <= slow_fraction < 1:
            raise ValueError("need 0 < target_fraction <= slow_fraction < 1, got "
                             f"{target_fraction} and {slow_fraction}")
        self.conn = connection
        self.governor = governor
        self.timeout_s = timeout_s
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.max_concurrency = max_concurrency
        self.max_pacing_retries = max_pacing_retries
        self.max_bars = max_bars
        self.slow_fraction = slow_fraction
        self.target_fraction = target_fraction

    async def fetch(self, contract: Contract, plan: list[HistoricalRequest],
                    progress: Callable[[int, int], None] | None = None) -> FetchResult:
        """Run every request of ``plan``; bars are merged, de-duplicated (a later answer
        wins) and sorted. Raises :class:`IBError` for failures retrying cannot fix."""
        result = FetchResult(empty_bars(), requests_planned=len(plan), max_bars=self.max_bars)
        if not plan:
            return result
        small = ib_rules.is_small_bar(plan[0].bar_size)
        gate = asyncio.Semaphore(1 if small else self.max_concurrency)
        done = 0
        frames: list[tuple[tuple[int, ...], pd.DataFrame]] = []

        async def one(k: int, req: HistoricalRequest) -> None:
            nonlocal done
            async with gate:
                await self._sized(contract, req, result, (k,), frames)
            done += 1
            if progress is not None:
                progress(done, len(plan))

        tasks = [asyncio.ensure_future(one(k, req)) for k, req in enumerate(plan)]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        frames.sort(key=lambda kf: kf[0])
        parts = [f for _, f in frames if len(f)]
        if parts:
            merged = pd.concat(parts)
            merged = merged[~merged.index.duplicated(keep="last")].sort_index()
            result.frame = merged
        self.conn.record_fetch()
        return result

    async def _sized(self, contract: Contract, req: HistoricalRequest, result: FetchResult,
                     key: tuple[int, ...],
                     frames: list[tuple[tuple[int, ...], pd.DataFrame]]) -> None:
        """Run ``req`` at the current budget: re-planned smaller first when the budget has
        shrunk below it, split in two when it times out (see the module docstring)."""
        budget = result.max_bars
        if budget is not None and req.bars is not None and req.bars > budget:
            pieces = split_request(req, budget)
            if len(pieces) > 1:
                log.info("%s: %d bars is over the current budget of %d; asking in %d "
                         "smaller requests", _describe(contract, req), req.bars, budget,
                         len(pieces))
                result.requests_planned += len(pieces) - 1
                for j, piece in enumerate(pieces):
                    await self._sized(contract, piece, result, (*key, j), frames)
                return
        try:
            frame = await self._run(contract, req, result, splittable=can_split(req))
        except _TimedOut:
            halves = split_request(req)
            result.splits += 1
            result.requests_planned += len(halves) - 1
            if req.bars is not None:
                self._lower_budget(result, max(1, max(h.bars or 1 for h in halves)),
                                   f"{_describe(contract, req)} timed out")
            log.warning("%s: no answer within %.0fs; asking again in %d smaller requests",
                        _describe(contract, req), self.timeout_s, len(halves))
            for j, piece in enumerate(halves):
                await self._sized(contract, piece, result, (*key, j), frames)
            return
        frames.append((key, frame))

    def _lower_budget(self, result: FetchResult, budget: int, why: str) -> None:
        if result.max_bars is None or budget < result.max_bars:
            log.info("%s: at most %d bars per request for the rest of this fetch (was %s)",
                     why, budget, result.max_bars)
            result.max_bars = budget

    def _observe(self, req: HistoricalRequest, bars: int, elapsed: float,
                 result: FetchResult) -> None:
        """An answer that took more than ``slow_fraction`` of the timeout lowers the
        budget to what would take ``target_fraction`` of it at the speed just seen."""
        if elapsed <= self.slow_fraction * self.timeout_s:
            return
        size = max(bars, req.bars or 0, 1)
        budget = max(1, int(size * self.target_fraction * self.timeout_s / elapsed))
        self._lower_budget(result, budget, f"{size} bars answered in {elapsed:.1f}s "
                           f"(timeout {self.timeout_s:.0f}s)")

    async def _run(self, contract: Contract, req: HistoricalRequest,
                   result: FetchResult, splittable: bool = False) -> pd.DataFrame:
        """One request until answered; raises :class:`_TimedOut` instead of retrying a
        ``splittable`` request that timed out."""
        failures = 0
        pacing = 0
        while True:
            try:
                bars = await self._request_once(contract, req, result)
                frame = bars_to_frame(bars)
                if len(frame) == 0:
                    result.empty_answers += 1
                lo, hi = req.covers
                if not ib_rules.is_daily_or_larger(req.bar_size):
                    frame = frame[(frame.index >= lo) & (frame.index < hi)]
                return frame
            except IBError as exc:
                if splittable and isinstance(exc, RequestTimeout):
                    raise _TimedOut() from None
                if exc.kind is ErrorKind.NO_DATA:
                    result.empty_answers += 1
                    reason = exc.ib_text or str(exc)
                    result.no_data_reasons.append(reason)
                    log.info("no bars for %s: IB says %r", _describe(contract, req), reason)
                    return empty_bars()
                if exc.kind is ErrorKind.PACING:
                    pacing += 1
                    result.pacing_violations += 1
                    result.retries += 1
                    wait = self.governor.report_violation(
                        large=not ib_rules.is_small_bar(req.bar_size))
                    if pacing > self.max_pacing_retries:
                        raise
                    log.warning("pacing violation for %s; backing off %.3g s and retrying",
                                _describe(contract, req), wait)
                    continue
                if not exc.retryable:
                    raise
                failures += 1
                result.retries += 1
                if failures >= self.attempts:
                    raise IBError(_giving_up(exc, failures), exc.code, exc.kind,
                                  exc.ib_text) from exc
                delay = self.backoff_s * 2 ** (failures - 1)
                if exc.kind is ErrorKind.UNRECOGNISED and ib_rules.is_small_bar(req.bar_size):
                    # perhaps a translated pacing violation (see errors.py): the governor
                    # holds paced requests back as for one (its slot waits the penalty
                    # out), but only for the configured attempts
                    self.governor.report_violation(large=False)
                log.warning("%s failed (%s); retry %d/%d in %.1fs", _describe(contract, req),
                            exc, failures, self.attempts - 1, delay)
                await asyncio.sleep(delay)

    async def _request_once(self, contract: Contract, req: HistoricalRequest,
                            result: FetchResult) -> BarDataList:
        ib = await self.conn.ensure_connected()
        end = req.ib_end_string()
        small = ib_rules.is_small_bar(req.bar_size)
        key = None
        if small:
            key = bars_pacing_key(str(contract.conId or contract.symbol),
                                    contract.exchange or "", end, req.duration, req.bar_size,
                                    req.what_to_show, req.use_rth)
        if small:
            await _until_sent_at_once(ib)
        async with self.governor.slot(key, small=small):
            if small:
                await _until_sent_at_once(ib)
            if not ib.isConnected():
                raise Disconnected("not connected to IB", kind=ErrorKind.RETRYABLE)
            result.requests_made += 1
            sent = asyncio.get_running_loop().time()
            bars = await self._send(ib, contract, req, end)
            self._observe(req, len(bars), asyncio.get_running_loop().time() - sent, result)
            return bars

    async def _send(self, ib, contract: Contract, req: HistoricalRequest,
                    end: str) -> BarDataList:
        """One reqHistoricalData with its own request id, so that IB's error answers —
        including 321, which ib_async treats as a warning and would leave hanging — end it
        at once, and a timeout cancels it instead of returning an empty list."""
        req_id = ib.client.getReqId()
        bars = BarDataList()
        bars.reqId = req_id
        future = ib.wrapper.startReq(req_id, contract, container=bars)
        errors: list[tuple[int, str]] = []

        def on_error(rid: int, code: int, message: str, _contract) -> None:
            if rid == req_id:
                errors.append((code, message))
                if not future.done() and code == ib_rules.ERR_VALIDATION:
                    future.set_exception(RequestError(rid, code, message))

        ib.errorEvent += on_error
        try:
            ib.client.reqHistoricalData(req_id, contract, end, req.duration, req.bar_size,
                                        req.what_to_show, int(req.use_rth), 2, False, [])
            await asyncio.wait_for(asyncio.shield(future), self.timeout_s)
            return bars
        except TimeoutError:
            if ib.isConnected():
                ib.client.cancelHistoricalData(req_id)
            raise RequestTimeout(f"no answer within {self.timeout_s:.0f}s for "
                                 f"{_describe(contract, req)}; cancelled") from None
        except RequestError as exc:
            raise IBError.from_answer(exc.code, exc.message, _describe(contract, req),
                                      sec_type=contract.secType,
                                      what_to_show=req.what_to_show) from None
        except ConnectionError as exc:
            raise Disconnected(f"connection lost during {_describe(contract, req)}: {exc}",
                               kind=ErrorKind.RETRYABLE) from None
        finally:
            ib.errorEvent -= on_error
            ib.wrapper._futures.pop(req_id, None)  # noqa: SLF001 - our own request
            ib.wrapper._results.pop(req_id, None)  # noqa: SLF001
            ib.wrapper._reqId2Contract.pop(req_id, None)  # noqa: SLF001


class _TimedOut(Exception):
    """A splittable request got no answer in time (it was cancelled): split it."""


async def _until_sent_at_once(ib, poll_s: float = 0.005) -> None:
    """Wait while ib_async's own throttle (45 messages/s) would queue a new message.

    The pacing governor records a request when it grants the slot; a message that then
    waited in ib_async's queue would reach IB later than recorded and could break a pacing
    window. This peeks at ib_async's queue (``Client._msgQ``/``_timeQ``, 2.1) so that a
    granted small-bar request leaves the socket immediately."""
    client = ib.client
    interval = getattr(client, "RequestsInterval", 1.0)
    limit = getattr(client, "MaxRequests", 0)
    loop = asyncio.get_running_loop()
    while True:
        queued = getattr(client, "_msgQ", None)
        times = getattr(client, "_timeQ", None)
        busy = bool(queued)
        if not busy and limit and times is not None:
            now = loop.time()
            busy = sum(1 for t in times if now - t <= interval) >= limit - 1
        if not busy:
            return
        await asyncio.sleep(poll_s)


def _giving_up(exc: IBError, attempts: int) -> str:
    """The final message of a request that kept failing: IB's own text first."""
    if exc.kind is ErrorKind.UNRECOGNISED:
        return (f"{exc} — IB's 162 text is none this loader knows (not pacing, not 'no data'); "
                f"gave up after {attempts} attempts")
    return f"{exc} — gave up after {attempts} attempts"


def _describe(contract: Contract, req: HistoricalRequest) -> str:
    name = contract.localSymbol or contract.symbol
    return (f"{name} {req.bar_size} {req.duration} ending {req.ib_end_string()} "
            f"{req.what_to_show} useRTH={int(req.use_rth)}")
