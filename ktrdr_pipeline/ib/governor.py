"""The pacing governor: every historical request waits here until IB's rules allow it.

Usage, around each ``reqHistoricalData`` / ``reqHeadTimeStamp`` (until its answer or cancel)::

    governor = PacingGovernor(SqlitePacingLedger(path), PacingLimits())
    key = bars_pacing_key(conid, "SMART", end, "1800 S", "1 secs", "TRADES", True)
    async with governor.slot(key, small=True):
        bars = await ib.reqHistoricalDataAsync(...)
    # a 162 pacing violation anyway: governor.report_violation(), then retry

For bars of 1 min and larger pass ``None`` (no hard rules) and ``small=False``.

How waiting works: the ledger answers either "granted" or "wait w seconds" (the exact time
until the binding rule lets this request through, computed by
:meth:`~ktrdr_pipeline.domain.pacing.PacingWindow.next_allowed`). The governor sleeps exactly
``w`` and asks again, so each request goes at the earliest time the rules allow. Waiters in
this process refused for the same reason (the global window, one contract's window, the
open-request cap, ...) queue behind one lock instead of all waking at the same instant and
racing for the one slot that frees up; only the head of each queue talks to the ledger.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime

from ..domain.ib_rules import MAX_OPEN_HISTORICAL_REQUESTS, PacingLimits
from ..domain.pacing import PacedRequest
from .ledger import (
    CONTRACT,
    DEFAULT_LEASE_TTL,
    DEFAULT_MAX_OPEN_LARGE,
    GLOBAL,
    IDENTICAL,
    OPEN,
    OPEN_LARGE,
    PENALTY,
    PacingLedger,
    Reservation,
    SlotPolicy,
)

log = logging.getLogger(__name__)

#: Waits this long or longer are announced at INFO with their reason and end time.
LONG_WAIT_S = 3.0
#: What a wait for each ledger reason means, in a user's words.
WAIT_REASONS = {
    PENALTY: "IB reported a pacing violation; requests of that kind are held back in "
             "every process on this machine",
    IDENTICAL: "IB allows no identical historical request within 15 s",
    CONTRACT: "IB allows fewer than 6 requests per contract and data type within 2 s",
    GLOBAL: "IB allows at most 60 small-bar and head-timestamp requests in 10 minutes",
    OPEN: "IB allows at most 50 historical requests open at once",
    OPEN_LARGE: "the configured maximum of open requests for bars of 1 min and larger "
                "(KTRDR_MAX_CONCURRENT_LARGE) is reached",
}


def _utc(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds")

class PacingGovernor:
    """Admits historical requests no faster than IB's pacing rules allow, across processes.

    ``safety_margin`` stretches every window by that fraction (plus ``safety_margin_s``
    unscaled seconds), to absorb the delay between the reservation and IB receiving the
    request; the achievable rate is ``1 / (1 + safety_margin)`` of the rules' maximum.
    ``backoff_initial_s`` / ``backoff_max_s`` are unscaled seconds like the windows of
    ``limits`` (multiplied by ``limits.time_scale``). ``lease_ttl`` and ``open_poll`` are
    real seconds: held leases are renewed every ``lease_ttl / 3``; ``open_poll`` bounds how
    long a waiter for an open-request slot sleeps before looking for releases by other
    processes (releases in this process wake it at once).
    """

    def __init__(
        self,
        ledger: PacingLedger,
        limits: PacingLimits | None = None,
        max_open: int = MAX_OPEN_HISTORICAL_REQUESTS,
        max_open_large: int = DEFAULT_MAX_OPEN_LARGE,
        *,
        safety_margin: float = 0.05,
        safety_margin_s: float = 0.0,
        backoff_initial_s: float = 15.0,
        backoff_max_s: float = 600.0,
        lease_ttl: float = DEFAULT_LEASE_TTL,
        open_poll: float = 0.1,
    ) -> None:
        if not 0 < max_open_large <= max_open <= MAX_OPEN_HISTORICAL_REQUESTS:
            raise ValueError(
                f"need 0 < max_open_large ({max_open_large}) <= max_open ({max_open}) "
                f"<= {MAX_OPEN_HISTORICAL_REQUESTS}"
            )
        if safety_margin < 0 or safety_margin_s < 0:
            raise ValueError("safety margins must be >= 0")
        self.ledger = ledger
        self.limits = limits or PacingLimits()
        stretch = 1.0 + safety_margin
        lim = self.limits
        #: The limits actually enforced: the nominal windows plus the safety margin.
        self.effective_limits = dataclasses.replace(
            lim,
            identical_window_s=lim.identical_window_s * stretch + safety_margin_s,
            same_contract_window_s=lim.same_contract_window_s * stretch + safety_margin_s,
            global_window_s=lim.global_window_s * stretch + safety_margin_s,
        )
        self.policy = SlotPolicy(self.effective_limits, max_open, max_open_large, lease_ttl)
        self.backoff_initial = backoff_initial_s * lim.time_scale
        self.backoff_max = backoff_max_s * lim.time_scale
        self.open_poll = open_poll
        # per scope (large bars or not): the penalty the last violation of that kind
        # imposed; 0 after a success of that kind
        self._backoff: dict[bool, float] = {False: 0.0, True: 0.0}
        self._violations = 0  # how many report_violation() calls so far
        self._gates: dict[str, asyncio.Lock] = {}
        self._gate_users: dict[str, int] = {}
        # Set (and replaced) whenever this process releases a slot; tied to its event loop.
        self._released: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None

    # -- public API --

    @asynccontextmanager
    async def slot(
        self, request_key: PacedRequest | None, small: bool | None = None
    ) -> AsyncIterator[Reservation]:
        """Wait until the request may be sent, hold an open-request slot, release on exit.

        ``small`` defaults to whether ``request_key`` is given; ``small=False`` requests
        also count against ``max_open_large``. The slot is released however the block
        exits (normally, by an exception or by cancellation).
        """
        large = not (request_key is not None if small is None else small)
        if request_key is not None:
            budget = min(self.limits.same_contract_max, self.limits.global_max)
            if request_key.weight > budget:
                raise ValueError(f"request weight {request_key.weight} exceeds {budget}")
        reservation = await self._acquire(request_key, large)
        token = reservation.token
        assert token is not None
        seen_violations = self._violations
        renewer: asyncio.Task[None] | None = None
        ok = False
        try:
            renewer = asyncio.create_task(self._renew(token), name=f"pacing-lease-{token}")
            yield reservation
            ok = True
        finally:
            if renewer is not None:
                renewer.cancel()
            self._release(token)
            if ok and self._violations == seen_violations:
                self.report_success(large=large)

    def report_violation(self, *, large: bool = False) -> float:
        """IB answered 162 pacing violation: hold back the requests of its kind in every
        process — the paced ones (small bars, head timestamps), or with ``large`` those for
        bars of 1 min and larger (IB's soft throttle) — and the caller retries through
        :meth:`slot`, which waits the penalty out.

        The penalty starts at ``backoff_initial``, doubles on each further violation up to
        ``backoff_max`` and goes back to the start after a success. Returns the penalty.
        """
        self._violations += 1
        backoff = self._backoff[large]
        backoff = self.backoff_initial if backoff <= 0 else min(backoff * 2, self.backoff_max)
        self._backoff[large] = backoff
        until = self.ledger.penalize(backoff, large=large)
        log.warning(
            "IB reported a pacing violation: holding %s requests for %.3g s (until %s)",
            "large-bar" if large else "paced", backoff, _utc(until))
        return backoff

    def report_success(self, *, large: bool = False) -> None:
        """A request of that kind was answered: its next violation starts the back-off
        afresh."""
        if self._backoff[large]:
            log.info("pacing back-off reset after a successful request")
        self._backoff[large] = 0.0

    @property
    def backoff(self) -> float:
        """The penalty the last violation of paced requests imposed (0 after a success)."""
        return self._backoff[False]

    def open_count(self, *, large_only: bool = False) -> int:
        """Open requests recorded in the ledger (all processes)."""
        return self.ledger.open_count(large_only=large_only)

    # -- internals --

    def _announce(self, res: Reservation, announced: str) -> str:
        """Log a wait of :data:`LONG_WAIT_S` or more at INFO, once per reason and end: a
        user sees why nothing happens, and until when."""
        until = res.at + res.wait
        key = f"{res.reason}@{round(until)}"
        if res.wait >= LONG_WAIT_S and key != announced:
            log.info("waiting %.0f s, until %s: %s", res.wait, _utc(until),
                     WAIT_REASONS.get(res.reason, res.reason))
            return key
        return announced

    async def _acquire(self, request: PacedRequest | None, large: bool) -> Reservation:
        gate_key: str | None = None
        announced = ""
        try:
            while True:
                res = self.ledger.try_reserve(request, self.policy, large=large)
                if res.granted:
                    return res
                key = self._gate_key(res.reason, request)
                if key != gate_key:
                    # Queue behind the waiters refused for the same reason, then look again:
                    # the state may have changed while queued.
                    if gate_key is not None:
                        self._leave_gate(gate_key)
                        gate_key = None
                    await self._enter_gate(key)
                    gate_key = key
                    continue
                log.debug("pacing: waiting %.4f s (%s)", res.wait, res.reason)
                announced = self._announce(res, announced)
                if res.reason in (OPEN, OPEN_LARGE):
                    await self._wait_release(min(res.wait, self.open_poll))
                else:
                    await asyncio.sleep(res.wait)
        finally:
            if gate_key is not None:
                self._leave_gate(gate_key)

    @staticmethod
    def _gate_key(reason: str, request: PacedRequest | None) -> str:
        if reason == CONTRACT and request is not None:
            return f"{reason}:{request.tick_key}"
        if reason == IDENTICAL and request is not None:
            return f"{reason}:{request.identity}"
        if reason == PENALTY:  # each kind waits out its own penalty, not the other's
            return f"{reason}:{'paced' if request is not None else 'large'}"
        return reason

    async def _enter_gate(self, key: str) -> None:
        lock = self._gates.get(key)
        if lock is None:
            lock = self._gates[key] = asyncio.Lock()
        self._gate_users[key] = self._gate_users.get(key, 0) + 1
        try:
            await lock.acquire()
        except BaseException:
            self._drop_gate_user(key)
            raise

    def _leave_gate(self, key: str) -> None:
        self._gates[key].release()
        self._drop_gate_user(key)

    def _drop_gate_user(self, key: str) -> None:
        self._gate_users[key] -= 1
        if not self._gate_users[key]:
            del self._gate_users[key], self._gates[key]

    async def _wait_release(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        if self._released is None or self._released[0] is not loop:
            self._released = (loop, asyncio.Event())
        try:
            await asyncio.wait_for(self._released[1].wait(), timeout)
        except TimeoutError:
            pass

    def _release(self, token: str) -> None:
        try:
            self.ledger.release(token)
        except Exception:
            # The lease then ends by expiry (or when this process exits).
            log.exception("could not release pacing lease %s", token)
        if self._released is not None:
            self._released[1].set()
            self._released = None  # later waiters get a fresh event

    async def _renew(self, token: str) -> None:
        ttl = self.policy.lease_ttl
        while True:
            await asyncio.sleep(ttl / 3)
            try:
                if not self.ledger.renew(token, ttl):
                    log.warning("pacing lease %s was purged while still in use", token)
                    return
            except Exception:
                log.exception("could not renew pacing lease %s", token)
