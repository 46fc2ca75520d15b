"""The pipeline's universe file: which symbols to keep, how, and at which timeframes.

``KTRDR_DATA_DIR/universe.yaml`` (or the path in ``KTRDR_UNIVERSE``)::

    symbols:
      - AAPL                                  # a bare symbol: discovered CASH → STK → FUT
      - symbol: ES
        contract: ES:FUT:CME:USD              # the explicit form skips the guessing
        timeframes: [1h, 1d]                  # default: every enabled timeframe
      - symbol: SPY
        rth: false                            # all hours for this stock

An invalid entry is reported and skipped; the others still apply.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .domain.symbols import SymbolError, parse_symbol
from .domain.timeframes import get_timeframe

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UniverseEntry:
    key: str  # the storage key and partition key
    contract: str  # what to resolve at IB (the explicit form when given)
    timeframes: tuple[str, ...] | None = None
    rth: bool | None = None


@dataclass
class Universe:
    entries: list[UniverseEntry]
    errors: list[str]

    @property
    def keys(self) -> list[str]:
        return [e.key for e in self.entries]

    def rth_overrides(self) -> dict[str, bool]:
        return {e.key: e.rth for e in self.entries if e.rth is not None}

    def wants(self, key: str, timeframe: str) -> bool:
        for e in self.entries:
            if e.key == key:
                return e.timeframes is None or timeframe in e.timeframes
        return True


def _entry(raw: Any) -> UniverseEntry:
    if isinstance(raw, str):
        return UniverseEntry(parse_symbol(raw).key, raw)
    if not isinstance(raw, dict) or "symbol" not in raw:
        raise ValueError(f"entry {raw!r} must be a symbol or a mapping with 'symbol'")
    unknown = set(raw) - {"symbol", "contract", "timeframes", "rth"}
    if unknown:
        raise ValueError(f"entry {raw['symbol']!r} has unknown fields {sorted(unknown)}; allowed: "
                         "symbol, contract, timeframes, rth")
    contract = str(raw.get("contract") or raw["symbol"])
    key = parse_symbol(str(raw["symbol"])).key
    parse_symbol(contract)
    tfs = raw.get("timeframes")
    if tfs is not None:
        if not isinstance(tfs, list):
            raise ValueError(f"entry {key}: timeframes must be a list")
        tfs = tuple(get_timeframe(str(t)).name for t in tfs)
    rth = raw.get("rth")
    if rth is not None and not isinstance(rth, bool):
        raise ValueError(f"entry {key}: rth must be true or false")
    return UniverseEntry(key, contract, tfs, rth)


def load_universe(path: Path) -> Universe:
    """Read the universe file; a missing file is an empty universe."""
    if not path.exists():
        return Universe([], [])
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        return Universe([], [f"cannot read {path}: {exc}"])
    items = raw.get("symbols", []) if isinstance(raw, dict) else None
    if not isinstance(items, list):
        return Universe([], [f"{path}: expected a mapping with a 'symbols' list"])
    entries, errors, seen = [], [], set()
    for item in items:
        try:
            entry = _entry(item)
        except (SymbolError, ValueError) as exc:
            errors.append(f"{path}: skipped {item!r}: {exc}")
            continue
        if entry.key in seen:
            errors.append(f"{path}: skipped duplicate symbol {entry.key}")
            continue
        seen.add(entry.key)
        entries.append(entry)
    return Universe(entries, errors)
