"""Symbols to IB contracts: validation, discovery, a cache, head timestamps.

A *symbol* is what users type and what names stored files: ``AAPL``, ``EURUSD``,
``ES``, or an explicit ``SYMBOL:SECTYPE[:EXCHANGE[:CURRENCY[:EXPIRY]]]``. Symbols are
validated before anything else because they become path components.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ib_async import Contract, ContractDetails

from ..domain.pacing import head_timestamp_pacing_key
from .connection import IBConnection
from .errors import ContractNotFound, ErrorKind, IBError, SymbolError
from .fetch import default_what_to_show
from .governor import PacingGovernor

log = logging.getLogger(__name__)

#: ISO codes of the currencies IDEALPRO trades; a 6-letter symbol made of two is an FX pair.
CURRENCIES = frozenset(
    "USD EUR GBP JPY CHF CAD AUD NZD SEK NOK DKK HKD SGD CNH MXN ZAR PLN CZK HUF ILS TRY KRW "
    "RUB".split()
)
SEC_TYPES = ("STK", "CASH", "FUT", "IND", "OPT", "CONTFUT")
_PLAIN = re.compile(r"^[A-Z0-9][A-Z0-9._-]{0,23}$")
#: The shape of every storage key (``SymbolSpec.key``), as a regular expression without
#: anchors; keys never contain ``..`` either. SQL in the catalog checks keys with it.
STORAGE_KEY_PATTERN = r"[A-Z0-9][A-Z0-9._-]*"
_FX_FORMS = re.compile(r"^([A-Z]{3})[./]([A-Z]{3})$")
_EXPLICIT = re.compile(r"^[A-Z0-9][A-Z0-9._-]{0,23}(:[A-Z0-9._-]{0,16}){1,4}$")


@dataclass(frozen=True)
class SymbolSpec:
    """A validated symbol: its storage key and what it tells about the contract."""

    key: str  # safe as a file name: letters, digits, '.', '-', '_'
    symbol: str
    sec_type: str = ""  # empty for a bare symbol: discovered CASH → STK → FUT
    exchange: str = ""
    currency: str = ""
    expiry: str = ""


def parse_symbol(text: str) -> SymbolSpec:
    """Validate a symbol string; raise :class:`SymbolError` saying what is allowed."""
    raw = text.strip()
    allowed = ("letters, digits, '.', '-', '_', ':' for the explicit form "
               "SYMBOL:SECTYPE[:EXCHANGE[:CURRENCY[:EXPIRY]]], and '/' only in FX pairs "
               "like EUR/USD")
    if not raw:
        raise SymbolError(f"empty symbol; allowed: {allowed}")
    if ".." in raw or "\\" in raw or raw.startswith((".", "-")) or "\0" in raw:
        raise SymbolError(f"invalid symbol {text!r}: no '..', backslashes or leading '.'/'-'; "
                          f"allowed: {allowed}")
    upper = raw.upper()
    fx = _FX_FORMS.match(upper)
    if fx:
        base, quote = fx.groups()
        if base in CURRENCIES and quote in CURRENCIES:
            return SymbolSpec(base + quote, base, "CASH", "IDEALPRO", quote)
        raise SymbolError(f"invalid FX pair {text!r}: unknown currency; known: "
                          f"{', '.join(sorted(CURRENCIES))}")
    if "/" in upper:
        raise SymbolError(f"invalid symbol {text!r}: '/' is only allowed in FX pairs such as "
                          f"EUR/USD; allowed: {allowed}")
    if ":" in upper:
        if not _EXPLICIT.match(upper):
            raise SymbolError(f"invalid symbol {text!r}; allowed: {allowed}")
        parts = upper.split(":") + [""] * 4
        symbol, sec_type, exchange, currency, expiry = parts[:5]
        if sec_type not in SEC_TYPES:
            raise SymbolError(f"invalid security type {sec_type!r} in {text!r}; allowed: "
                              f"{', '.join(SEC_TYPES)}")
        if expiry and not re.fullmatch(r"\d{6}(\d{2})?", expiry):
            raise SymbolError(f"invalid expiry {expiry!r} in {text!r}: use YYYYMM or YYYYMMDD")
        key = "_".join(p for p in (symbol, sec_type if sec_type != "STK" else "", expiry) if p)
        if sec_type == "CASH" and len(symbol) == 6:
            symbol, currency = symbol[:3], currency or symbol[3:]
            key = symbol + currency
        return SymbolSpec(key, symbol, sec_type, exchange, currency, expiry)
    if not _PLAIN.match(upper):
        raise SymbolError(f"invalid symbol {text!r}; allowed: {allowed}")
    if len(upper) == 6 and upper[:3] in CURRENCIES and upper[3:] in CURRENCIES:
        return SymbolSpec(upper, upper[:3], "", "", upper[3:])  # CASH tried first
    return SymbolSpec(upper, upper)


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

    @classmethod
    def from_details(cls, key: str, cd: ContractDetails) -> ResolvedContract:
        c = cd.contract
        return cls(key, c.conId, c.symbol, c.secType, c.exchange, c.currency, c.localSymbol,
                   c.primaryExchange, c.lastTradeDateOrContractMonth, c.multiplier,
                   cd.timeZoneId, c.tradingClass, cd.longName, time.time())


class JsonCache:
    """A small JSON file of entries with an expiry, written atomically."""

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
        entry = self._load().get(key)
        if not entry or time.time() - entry.get("stored_at", 0) > self.ttl_s:
            return None
        return entry["value"]

    def put(self, key: str, value: Any) -> None:
        data = self._load()
        data[key] = {"stored_at": time.time(), "value": value}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(data, fh, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


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
                 timeout_s: float = 30.0, ttl_s: float = 7 * 86400):
        self.conn = connection
        self.governor = governor
        self.timeout_s = timeout_s
        self.cache = JsonCache(data_dir / "cache" / "head_timestamps.json", ttl_s)

    async def get(self, contract: ResolvedContract, what_to_show: str | None = None,
                  use_rth: bool = True) -> datetime:
        what = what_to_show or contract.what_to_show
        key = f"{contract.con_id}|{what}|{int(use_rth)}"
        cached = self.cache.get(key)
        if cached is not None:
            return datetime.fromisoformat(cached)
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
                                              f"head timestamp of {contract.key}") from None
                raise
        if not isinstance(value, datetime):
            raise IBError(f"no head timestamp for {contract.key}: IB answered {value!r}",
                          kind=ErrorKind.NO_DATA)
        value = value if value.tzinfo else value.replace(tzinfo=UTC)
        self.cache.put(key, value.astimezone(UTC).isoformat())
        return value.astimezone(UTC)
