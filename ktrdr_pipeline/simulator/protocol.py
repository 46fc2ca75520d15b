"""TWS socket protocol encoding (``docs/ib-facts.md`` §7).

After the client's ``API\\0`` greeting every message is a 4-byte big-endian length followed
by NUL-terminated UTF-8 fields. Besides the framing: the contract fields of requests, and
the time stamps of historical bars.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Iterable
from datetime import datetime
from zoneinfo import ZoneInfo

#: The protocol version this simulator speaks; ib_async 2.1 accepts 157–178.
SERVER_VERSION = 178
MIN_CLIENT_VERSION = 157
#: A frame larger than this is treated as malformed and the connection is closed.
MAX_FRAME_BYTES = 1 << 20


class ProtocolError(Exception):
    """The peer sent bytes that are not a valid TWS API frame."""


def format_field(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        if value != value:  # NaN
            return ""
        return repr(value) if value != int(value) or abs(value) >= 1e15 else str(int(value))
    return str(value)


def encode(fields: Iterable[object]) -> bytes:
    payload = "".join(format_field(f) + "\0" for f in fields).encode()
    return struct.pack(">I", len(payload)) + payload


async def read_frame(reader: asyncio.StreamReader) -> list[str]:
    """Read one framed message and split it into fields."""
    header = await reader.readexactly(4)
    (size,) = struct.unpack(">I", header)
    if size > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame of {size} bytes exceeds the {MAX_FRAME_BYTES}-byte limit")
    payload = await reader.readexactly(size)
    text = payload.decode("utf-8", errors="replace")
    fields = text.split("\0")
    if fields and fields[-1] == "":
        fields.pop()
    return fields


async def read_handshake(reader: asyncio.StreamReader) -> tuple[int, int, str]:
    """Read ``API\\0`` and the version range; return (min, max, connect options)."""
    prefix = await reader.readexactly(4)
    if prefix != b"API\0":
        raise ProtocolError(f"expected the 'API\\0' greeting, got {prefix!r}")
    header = await reader.readexactly(4)
    (size,) = struct.unpack(">I", header)
    if size > 1024:
        raise ProtocolError(f"version frame of {size} bytes is too long")
    text = (await reader.readexactly(size)).decode("ascii", errors="replace")
    versions, _, options = text.partition(" ")
    lo, sep, hi = versions.lstrip("v").partition("..")
    try:
        lo_v = int(lo)
        hi_v = int(hi) if sep else lo_v
    except ValueError:
        raise ProtocolError(f"malformed version range {text!r}") from None
    return lo_v, hi_v, options


#: The contract fields, in the order requests carry them.
CONTRACT_FIELDS = ("conId", "symbol", "secType", "lastTradeDateOrContractMonth", "strike",
                   "right", "multiplier", "exchange", "primaryExchange", "currency",
                   "localSymbol", "tradingClass")


def parse_contract(f: list[str]) -> dict[str, str]:
    """A request's contract fields, by name."""
    return dict(zip(CONTRACT_FIELDS, f, strict=False))


def describe(c: dict[str, str]) -> str:
    """A short human description of a request's contract, for logs and messages."""
    parts = [c.get("symbol") or c.get("localSymbol") or f"conId {c.get('conId')}",
             c.get("secType", ""), c.get("exchange", ""), c.get("currency", ""),
             c.get("lastTradeDateOrContractMonth", "")]
    return " ".join(p for p in parts if p)


def format_bar_time(t: datetime, fmt: str, tz: ZoneInfo, daily: bool) -> str:
    """A bar's time as historical data sends it: a date for daily bars, epoch seconds for
    formatDate 2, else local time with the zone name (formatDate 1)."""
    if daily:
        return t.strftime("%Y%m%d")
    if fmt == "2":
        return str(int(t.timestamp()))
    return t.astimezone(tz).strftime("%Y%m%d %H:%M:%S ") + str(tz.key)
