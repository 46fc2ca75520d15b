"""Symbols as users type them, and the storage keys that name stored files (pure).

A *symbol* is ``AAPL``, ``EURUSD`` (or ``EUR/USD``), ``ES``, or an explicit
``SYMBOL:SECTYPE[:EXCHANGE[:CURRENCY[:EXPIRY]]]``. Its *storage key* (``SymbolSpec.key``)
names the partition's directory and the Dagster partition, so symbols are validated
before anything else is done with them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


class SymbolError(ValueError):
    """A symbol string that is malformed or that IB does not know."""


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
    allowed = ("at most 24 letters, digits, '.', '-', '_' (a symbol), ':' for the explicit "
               "form SYMBOL:SECTYPE[:EXCHANGE[:CURRENCY[:EXPIRY]]] (parts after the symbol "
               "at most 16 characters each), and '/' only in FX pairs like EUR/USD")
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
        too_long = f" ({len(upper)} characters)" if len(upper) > 24 else ""
        raise SymbolError(f"invalid symbol {text!r}{too_long}; allowed: {allowed}")
    if len(upper) == 6 and upper[:3] in CURRENCIES and upper[3:] in CURRENCIES:
        return SymbolSpec(upper, upper[:3], "", "", upper[3:])  # CASH tried first
    return SymbolSpec(upper, upper)


def check_storage_key(symbol: str) -> str:
    """``symbol`` if it is already a canonical storage key (``parse_symbol(symbol).key``);
    ``ValueError`` saying what is allowed otherwise."""
    if not isinstance(symbol, str) or not symbol:
        raise ValueError(f"invalid symbol {symbol!r}: expected a storage key such as 'AAPL'")
    if "/" in symbol or "\\" in symbol or ".." in symbol or "\0" in symbol:
        raise ValueError(f"invalid symbol {symbol!r}: path separators and '..' are not allowed")
    try:
        key = parse_symbol(symbol).key
    except ValueError as exc:
        raise ValueError(f"invalid symbol {symbol!r}: {exc}") from None
    if key != symbol:
        raise ValueError(f"invalid symbol {symbol!r}: not a storage key; use {key!r} "
                         "(upper case, letters, digits, '.', '-', '_')")
    return symbol


def head_timestamp_cache_key(con_id: int | str, what_to_show: str, use_rth: bool) -> str:
    """The key under which a contract's head timestamp is cached (written by the IB client,
    read by the checks)."""
    return f"{con_id}|{what_to_show}|{int(use_rth)}"
