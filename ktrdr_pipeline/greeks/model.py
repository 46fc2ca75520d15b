"""The snapshot both bridges produce, and the rows it becomes in ``portfolio_greeks``.

A snapshot is one ``PORTFOLIO`` aggregate row plus one row per position. Per position:
``unit_*`` are the model Greeks of one contract as IB served them (options), and
``delta``/``gamma``/``vega``/``theta`` are the position's exposures, position x multiplier
x Greek, so the aggregate row is the column sum of the position rows. Non-option
positions have ``unit_delta`` 1 and the other Greeks 0. A Greek IB did not send (or sent
as a "not computed" sentinel) is NULL and the position counts in ``missing_greeks``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

GREEKS = ("delta", "gamma", "vega", "theta")
PORTFOLIO = "PORTFOLIO"
#: ``con_id`` of the aggregate row (IB contract ids are positive).
PORTFOLIO_CON_ID = 0


def clean_number(value: Any, sentinels: tuple[float, ...] = ()) -> float | None:
    """``value`` as a float, or None for None, NaN, infinities, non-numbers and IB's
    "not computed" ``sentinels`` (-2 for Greeks, -1 for implied vol and prices)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(x) or x in sentinels:
        return None
    return x


def clean_greek(value: Any) -> float | None:
    """A model Greek from IB: -2 means "not computed". ib_async maps it to None for
    delta and gamma but leaves vega and theta at -2.0 (``docs/ib-facts.md`` §5)."""
    return clean_number(value, (-2.0,))


def clean_price(value: Any) -> float | None:
    """An implied vol or price from IB: -1 means "not computed"; prices are positive."""
    x = clean_number(value, (-1.0,))
    return x if x is None or x > 0 else None


def snapshot_id(account: str, tick_time: datetime) -> str:
    """Deterministic per account and tick: a tick taken twice is stored once."""
    t = tick_time.astimezone(UTC)
    return f"{account}@{t:%Y-%m-%dT%H:%M:%S.%f}Z"


@dataclass(frozen=True)
class PositionGreeks:
    """One position and its model Greeks (per contract, as served)."""

    con_id: int
    symbol: str
    sec_type: str
    position: float
    multiplier: float = 1.0
    local_symbol: str = ""
    expiry: str = ""
    strike: float | None = None
    right: str = ""
    unit_delta: float | None = None
    unit_gamma: float | None = None
    unit_vega: float | None = None
    unit_theta: float | None = None
    implied_vol: float | None = None
    underlying_price: float | None = None

    @property
    def is_option(self) -> bool:
        return self.sec_type in ("OPT", "FOP")

    @property
    def missing(self) -> bool:
        return any(getattr(self, f"unit_{g}") is None for g in GREEKS)

    def exposure(self, greek: str) -> float | None:
        unit = getattr(self, f"unit_{greek}")
        return None if unit is None else self.position * self.multiplier * unit

    @classmethod
    def non_option(cls, **kwargs: Any) -> PositionGreeks:
        """A stock, future, FX... position: delta 1 per unit, the other Greeks 0."""
        return cls(unit_delta=1.0, unit_gamma=0.0, unit_vega=0.0, unit_theta=0.0, **kwargs)


@dataclass(frozen=True)
class Snapshot:
    """One snapshot of the portfolio's Greeks at poll tick ``tick_time``.

    ``snapshot_time`` is this machine's clock when the values were read; ``data_time``
    the source's own stamp when it has one (Client Portal ``_updated``; the receipt of
    the newest model-Greeks tick on the socket).
    """

    account: str
    mode: str
    tick_time: datetime
    snapshot_time: datetime
    positions: tuple[PositionGreeks, ...] = ()
    data_time: datetime | None = None
    snapshot_id: str = field(default="")

    def __post_init__(self) -> None:
        if not self.snapshot_id:
            object.__setattr__(self, "snapshot_id", snapshot_id(self.account, self.tick_time))

    @property
    def missing_greeks(self) -> int:
        return sum(1 for p in self.positions if p.missing)

    def totals(self) -> dict[str, float]:
        """Sum of position x multiplier x Greek over the positions that have it."""
        out = {}
        for g in GREEKS:
            values = [v for p in self.positions if (v := p.exposure(g)) is not None]
            out[g] = math.fsum(values)
        return out

    def rows(self) -> list[dict[str, Any]]:
        """The ``portfolio_greeks`` rows: the aggregate first, then one per position."""
        common = {
            "snapshot_id": self.snapshot_id,
            "tick_time": self.tick_time.astimezone(UTC),
            "snapshot_time": self.snapshot_time.astimezone(UTC),
            "data_time": self.data_time.astimezone(UTC) if self.data_time else None,
            "account": self.account,
            "mode": self.mode,
        }
        totals = self.totals()
        rows = [{
            **common,
            "con_id": PORTFOLIO_CON_ID,
            "symbol": PORTFOLIO,
            "sec_type": PORTFOLIO,
            "local_symbol": PORTFOLIO,
            "expiry": None,
            "strike": None,
            "option_right": None,
            "position": None,
            "multiplier": None,
            **totals,
            "unit_delta": None,
            "unit_gamma": None,
            "unit_vega": None,
            "unit_theta": None,
            "implied_vol": None,
            "underlying_price": None,
            "positions": len(self.positions),
            "missing_greeks": self.missing_greeks,
        }]
        for p in self.positions:
            rows.append({
                **common,
                "con_id": p.con_id,
                "symbol": p.symbol,
                "sec_type": p.sec_type,
                "local_symbol": p.local_symbol,
                "expiry": p.expiry or None,
                "strike": p.strike if p.is_option else None,
                "option_right": p.right or None,
                "position": p.position,
                "multiplier": p.multiplier,
                **{g: p.exposure(g) for g in GREEKS},
                "unit_delta": p.unit_delta,
                "unit_gamma": p.unit_gamma,
                "unit_vega": p.unit_vega,
                "unit_theta": p.unit_theta,
                "implied_vol": p.implied_vol,
                "underlying_price": p.underlying_price,
                "positions": 1,
                "missing_greeks": int(p.missing),
            })
        return rows

    def summary(self) -> Mapping[str, Any]:
        return {"snapshot_id": self.snapshot_id, "positions": len(self.positions),
                "missing_greeks": self.missing_greeks, **self.totals()}
