"""Symbols to IB contracts: discovery, a cache, head timestamps.

Symbols are parsed and validated in :mod:`ktrdr_pipeline.domain.symbols` before anything
else, because they become path components.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ib_async import Contract, ContractDetails

from ..domain import calendars
from ..domain.pacing import head_timestamp_pacing_key
from ..domain.symbols import SymbolError, SymbolSpec, head_timestamp_cache_key, parse_symbol
from ..locking import exclusive_file_lock
from .connection import IBConnection
from .errors import ContractNotFound, ErrorKind, IBError
from .fetch import default_what_to_show
from .governor import PacingGovernor

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class ResolvedContract:
    """A symbol resolved to one IB contract, with what the pipeline needs to know."""

    key: str
    con_id: int
    symbol: str
    sec_type: str
    exchange: str
    currency: str
    local_symbol: str
    primary_exchange: str
    expiry: str
    multiplier: str
    time_zone: str
    trading_class: str
    long_name: str
    resolved_at: float

    def contract(self) -> Contract:
        return Contract(conId=self.con_id, symbol=self.symbol, secType=self.sec_type,
                        exchange=self.exchange, currency=self.currency,
                        localSymbol=self.local_symbol,
                        lastTradeDateOrContractMonth=self.expiry,
                        primaryExchange=self.primary_exchange, multiplier=self.multiplier,
                        tradingClass=self.trading_class)

    @property
    def what_to_show(self) -> str:
        return default_what_to_show(self.sec_type)

    @property
    def profile(self) -> calendars.HoursProfile:
        """The contract's trading sessions (by security type, exchange and root)."""
        return calendars.profile_for(self.sec_type, self.exchange, self.symbol)

    @classmethod
    def from_details(cls, key: str, cd: ContractDetails) -> ResolvedContract:
        c = cd.contract
        return cls(key, c.conId, c.symbol, c.secType, c.exchange, c.currency, c.localSymbol,
                   c.primaryExchange, c.lastTradeDateOrContractMonth, c.multiplier,
                   cd.timeZoneId, c.tradingClass, cd.longName, time.time())


def cached_profile(entry: dict[str, Any]) -> calendars.HoursProfile:
    """The trading sessions of a contract cache entry (a :class:`ResolvedContract` as
    stored), as :attr:`ResolvedContract.profile` gives them."""
    return calendars.profile_for(entry["sec_type"], entry.get("exchange", ""),
                                 entry.get("symbol", ""))


class JsonCache:
    """A small JSON file of entries with an expiry, written atomically. Writers take turns
    (a lock file next to it), so two processes storing different keys at once keep both."""

    def __init__(self, path: Path, ttl_s: float):
        self.path = path
        self.ttl_s = ttl_s

    def _load(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            log.warning("cache %s is unreadable; starting it afresh", self.path)
            return {}

    def get(self, key: str) -> Any | None:
        return self._fresh(self._load().get(key), time.time())

    def values(self) -> dict[str, Any]:
        """Every unexpired entry's value by key, from one read of the file (for a caller
        that looks up many keys: one read, not one per key)."""
        now = time.time()
        fresh = {key: self._fresh(entry, now) for key, entry in self._load().items()}
        return {key: value for key, value in fresh.items() if value is not None}

    def _fresh(self, entry: dict[str, Any] | None, now: float) -> Any | None:
        if not entry or now - entry.get("stored_at", 0) > self.ttl_s:
            return None
        return entry["value"]

    def put(self, key: str, value: Any) -> None:
        with exclusive_file_lock(self.path.with_name(self.path.name + ".lock")):
            data = self._load()  # read under the lock: another writer's keys are kept
            data[key] = {"stored_at": time.time(), "value": value}
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name,
                                       suffix=".tmp")
            try:
                with os.fdopen(fd, "w") as fh:
                    json.dump(data, fh, indent=1, sort_keys=True)
                os.replace(tmp, self.path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise


def warn_if_hours_disagree(resolved: ResolvedContract, cd: ContractDetails) -> str | None:
    """Log one warning when IB's ``tradingHours`` for the coming week disagree with the
    instrument's calendar (docs/ib-facts.md §9: the contract details are IB's word on its
    sessions, about a week ahead). IB's bars are loaded either way; the ones outside the
    calendar's sessions are listed by the ``bars_outside_sessions`` check. Returns the
    warning (None when they agree or there is nothing to compare)."""
    if not cd.tradingHours:
        return None
    try:
        diff = calendars.hours_disagreement(resolved.profile, cd.tradingHours,
                                            cd.timeZoneId or None)
    except ValueError as exc:
        diff = f"IB's tradingHours {cd.tradingHours[:200]!r} cannot be compared: {exc}"
    if diff is None:
        return None
    message = (f"{resolved.key}: IB's contract details (tradingHours) disagree with the "
               f"session calendar for the coming week: {diff}. IB's bars are loaded either "
               f"way; bars outside the calendar's sessions are listed by the "
               f"bars_outside_sessions check")
    log.warning("%s", message)
    return message


class ContractResolver:
    """Resolves symbols through IB with a cache in ``KTRDR_DATA_DIR``."""

    def __init__(self, connection: IBConnection, data_dir: Path, *, ttl_s: float = 7 * 86400):
        self.conn = connection
        self.cache = JsonCache(data_dir / "cache" / "contracts.json", ttl_s)

    async def resolve(self, text: str, key: str | None = None) -> ResolvedContract:
        """Resolve ``text``; ``key`` stores the result under another name (a universe
        entry whose explicit contract form names a plain symbol key)."""
        spec = parse_symbol(text)
        if key is not None:
            spec = dataclasses.replace(spec, key=parse_symbol(key).key)
        cached = self.cache.get(spec.key)
        if cached is not None:
            return ResolvedContract(**cached)
        ib = await self.conn.ensure_connected()
        for candidate in self._candidates(spec):
            try:
                found = await ib.reqContractDetailsAsync(candidate)
            except Exception as exc:  # noqa: BLE001 - ib_async raises RequestError for 200
                if getattr(exc, "code", None) == 200:
                    continue
                raise
            found = [cd for cd in found if cd.contract]
            if not found:
                continue
            if candidate.secType == "FUT" and not spec.expiry:
                found.sort(key=lambda cd: cd.contract.lastTradeDateOrContractMonth)
                found = found[:1]  # the front contract
            if len(found) > 1:
                raise SymbolError(f"symbol {text!r} is ambiguous at IB ({len(found)} contracts: "
                                  + ", ".join(cd.contract.localSymbol for cd in found[:5])
                                  + "); use the explicit form SYMBOL:SECTYPE:EXCHANGE:CURRENCY")
            resolved = ResolvedContract.from_details(spec.key, found[0])
            warn_if_hours_disagree(resolved, found[0])
            self.cache.put(spec.key, asdict(resolved))
            return resolved
        raise ContractNotFound(f"unknown symbol {text!r}: IB has no contract for it "
                               f"(tried {', '.join(c.secType for c in self._candidates(spec))})",
                               200)

    @staticmethod
    def _candidates(spec: SymbolSpec) -> list[Contract]:
        if spec.sec_type == "CASH" or (not spec.sec_type and spec.currency):
            cash = Contract(symbol=spec.symbol, secType="CASH",
                            exchange=spec.exchange or "IDEALPRO", currency=spec.currency)
            if spec.sec_type:
                return [cash]
            return [cash, Contract(symbol=spec.key, secType="STK", exchange="SMART",
                                   currency="USD")]
        if spec.sec_type:
            return [Contract(symbol=spec.symbol, secType=spec.sec_type,
                             exchange=spec.exchange or ("SMART" if spec.sec_type == "STK" else ""),
                             currency=spec.currency or "USD",
                             lastTradeDateOrContractMonth=spec.expiry)]
        return [Contract(symbol=spec.symbol, secType="STK", exchange="SMART", currency="USD"),
                Contract(symbol=spec.symbol, secType="FUT", currency="USD")]

    async def validate_many(self, symbols: list[str]) -> dict[str, dict[str, Any]]:
        """Each symbol's outcome: ``{"ok": True, "contract": {...}}`` or the error."""
        results: dict[str, dict[str, Any]] = {}
        for text in symbols:
            try:
                resolved = await self.resolve(text)
                results[text] = {"ok": True, "contract": asdict(resolved)}
            except (SymbolError, IBError) as exc:
                results[text] = {"ok": False, "error": str(exc)}
        return results


class HeadTimestamps:
    """Earliest available data per contract, whatToShow and useRTH (cached, paced)."""

    def __init__(self, connection: IBConnection, governor: PacingGovernor, data_dir: Path, *,
                 timeout_s: float = 30.0, ttl_s: float = 7 * 86400,
                 max_pacing_retries: int = 5, attempts: int = 3):
        self.conn = connection
        self.governor = governor
        self.timeout_s = timeout_s
        self.attempts = attempts
        self.max_pacing_retries = max_pacing_retries
        self.cache = JsonCache(data_dir / "cache" / "head_timestamps.json", ttl_s)

    async def get(self, contract: ResolvedContract, what_to_show: str | None = None,
                  use_rth: bool = True) -> datetime:
        what = what_to_show or contract.what_to_show
        key = head_timestamp_cache_key(contract.con_id, what, use_rth)
        cached = self.cache.get(key)
        if cached is not None:
            return datetime.fromisoformat(cached)
        pacing = 0
        unrecognised = 0
        while True:
            try:
                value = await self._request(contract, what, use_rth)
                break
            except IBError as exc:
                # another tool on the account (TWS itself, a second data directory) can
                # cause it: hold back and retry through the governor, as for bars. A 162
                # this loader cannot read (a translated TWS, see errors.py) is held back
                # the same way — head timestamps are always paced — but only for
                # ``attempts`` tries, then it fails with IB's own text.
                if exc.kind is ErrorKind.UNRECOGNISED:
                    unrecognised += 1
                    if unrecognised >= self.attempts:
                        raise IBError(f"{exc} — IB's 162 text is none this loader knows; gave "
                                      f"up after {unrecognised} attempts", exc.code, exc.kind,
                                      exc.ib_text) from exc
                elif exc.kind is not ErrorKind.PACING or pacing >= self.max_pacing_retries:
                    raise
                else:
                    pacing += 1
                wait = self.governor.report_violation()
                log.warning("%s for the head timestamp of %s; backing off %.3g s and "
                            "retrying", "pacing violation" if exc.kind is ErrorKind.PACING
                            else f"unrecognised 162 ({exc.ib_text!r})", contract.key, wait)
        if not isinstance(value, datetime):
            raise IBError(f"no head timestamp for {contract.key}: IB answered {value!r}",
                          kind=ErrorKind.NO_DATA)
        value = value if value.tzinfo else value.replace(tzinfo=UTC)
        self.cache.put(key, value.astimezone(UTC).isoformat())
        return value.astimezone(UTC)

    async def _request(self, contract: ResolvedContract, what: str, use_rth: bool) -> object:
        """One reqHeadTimeStamp through the governor; IB's error answers as IBError."""
        ib = await self.conn.ensure_connected()
        paced = head_timestamp_pacing_key(str(contract.con_id), contract.exchange, what, use_rth)
        async with self.governor.slot(paced, small=True):
            try:
                value = await asyncio.wait_for(
                    ib.reqHeadTimeStampAsync(contract.contract(), what, use_rth, 2),
                    self.timeout_s)
            except TimeoutError:
                raise IBError(f"no head timestamp for {contract.key} within "
                              f"{self.timeout_s:.0f}s", kind=ErrorKind.RETRYABLE) from None
            except Exception as exc:
                code = getattr(exc, "code", None)
                if code is not None:
                    raise IBError.from_answer(code, getattr(exc, "message", str(exc)),
                                              f"head timestamp of {contract.key}",
                                              sec_type=contract.sec_type,
                                              what_to_show=what) from None
                raise
        return value
