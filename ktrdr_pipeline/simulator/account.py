"""The simulator's paper account: positions valued, quoted and Greeked from the market model.

Both the socket server and the Client Portal server read positions, prices and Greeks
from one :class:`AccountBook`, so the two APIs always agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from .clock import SimClock
from .market import MarketModel
from .options import (
    OptionGreeks,
    add_default_options,
    black_scholes,
    option_years,
    smile_vol,
)
from .universe import Instrument, Position, Universe


@dataclass(frozen=True)
class PortfolioRow:
    inst: Instrument
    position: float
    avg_cost: float  # per unit, times multiplier as IB reports averageCost
    market_price: float
    market_value: float
    unrealized_pnl: float


@dataclass(frozen=True)
class Quote:
    """Last, bid and ask of one instrument (and an option's Greeks), as both APIs show
    them: a spread of 5 basis points, at least one tick, around the last price."""

    price: float
    bid: float
    ask: float
    greeks: OptionGreeks | None = None


def price_text(x: float) -> str:
    """A price as IB prints it (socket API and Client Portal alike): no float noise."""
    return format(round(float(x), 8), ".10g")


#: The paper account's cash (USD).
CASH = 250_000.0


class AccountBook:
    """The paper account: positions valued from the market model at the clock's time."""

    def __init__(self, universe: Universe, market: MarketModel, clock: SimClock):
        self.universe = universe
        self.market = market
        self.clock = clock

    def underlying_of(self, inst: Instrument) -> Instrument:
        found = self.universe.by_symbol(inst.underlying or inst.symbol, "STK")
        if not found:
            raise KeyError(f"no underlying stock for {inst.local_symbol}")
        return found[0]

    def price(self, inst: Instrument, now: datetime | None = None) -> float:
        now = now or self.clock.now()
        if inst.sec_type == "OPT":
            return self.greeks(inst, now).price
        return self.market.last_price(inst, now)

    def greeks(self, inst: Instrument, now: datetime | None = None) -> OptionGreeks:
        now = now or self.clock.now()
        spot = self.market.last_price(self.underlying_of(inst), now)
        return black_scholes(spot, inst.strike, option_years(inst, now), smile_vol(inst, spot),
                             inst.right)

    def quote(self, inst: Instrument, now: datetime | None = None) -> Quote:
        now = now or self.clock.now()
        greeks = self.greeks(inst, now) if inst.sec_type == "OPT" else None
        price = greeks.price if greeks is not None else self.market.last_price(inst, now)
        spread = max(inst.tick, round(price * 0.0005 / inst.tick) * inst.tick)
        return Quote(price, round(price - spread / 2, 6), round(price + spread / 2, 6), greeks)

    def portfolio(self, now: datetime | None = None) -> list[PortfolioRow]:
        now = now or self.clock.now()
        rows = []
        for pos in self.universe.positions:
            inst = self.universe.instruments[pos.con_id]
            mult = inst.multiplier_value
            px = self.price(inst, now)
            value = px * pos.quantity * mult
            rows.append(PortfolioRow(inst, pos.quantity, pos.avg_cost, px, value,
                                     value - pos.avg_cost * pos.quantity))
        return rows

    def values(self, now: datetime | None = None) -> list[tuple[str, str, str]]:
        """The account's values as (tag, value, currency), for reqAccountUpdates and
        reqAccountSummary alike: cash, the positions at market, and margin figures derived
        from them (a Reg T account: 25 % maintenance, 4× intraday buying power)."""
        rows = self.portfolio(now)
        cash = CASH
        gross = sum(abs(r.market_value) for r in rows)
        net = round(cash + sum(r.market_value for r in rows), 2)
        unreal = round(sum(r.unrealized_pnl for r in rows), 2)
        init, maint = round(0.5 * gross, 2), round(0.25 * gross, 2)
        available = round(net - init, 2)
        usd = [
            ("NetLiquidation", net), ("TotalCashValue", cash), ("SettledCash", cash),
            ("AccruedCash", 0.0), ("BuyingPower", round(4 * max(available, 0.0), 2)),
            ("EquityWithLoanValue", net), ("PreviousDayEquityWithLoanValue", net),
            ("GrossPositionValue", round(gross, 2)), ("RegTEquity", net),
            ("RegTMargin", init), ("SMA", available), ("InitMarginReq", init),
            ("MaintMarginReq", maint), ("AvailableFunds", available),
            ("ExcessLiquidity", round(net - maint, 2)),
            ("Cushion", round((net - maint) / net, 4) if net else 0.0),
            ("FullInitMarginReq", init), ("FullMaintMarginReq", maint),
            ("FullAvailableFunds", available), ("FullExcessLiquidity", round(net - maint, 2)),
            ("UnrealizedPnL", unreal), ("RealizedPnL", 0.0),
        ]
        return [("AccountCode", self.universe.account, ""), ("AccountType", "INDIVIDUAL", ""),
                ("Currency", "USD", "USD")] + [(k, str(v), "USD") for k, v in usd] + [
                ("DayTradesRemaining", "-1", ""), ("Leverage", str(round(gross / net, 2))
                                                   if net else "0", "")]

    def pnl(self, now: datetime | None = None) -> tuple[float, float, float]:
        """Daily, unrealized and realized PnL of the account."""
        now = now or self.clock.now()
        unreal = sum(r.unrealized_pnl for r in self.portfolio(now))
        prev = now - timedelta(days=1)
        daily = 0.0
        for pos in self.universe.positions:
            inst = self.universe.instruments[pos.con_id]
            daily += (self.price(inst, now) - self.price(inst, prev)) * pos.quantity * \
                inst.multiplier_value
        return daily, unreal, 0.0


def add_default_options_and_positions(universe: Universe, market: MarketModel,
                                      now: datetime) -> None:
    """A few AAPL and SPY options near the money, and the default account's positions."""
    today = now.date()
    expiries, options = add_default_options(universe, market, now)
    if universe.positions:
        return
    cost_time = now - timedelta(days=30)

    def cost(inst: Instrument) -> float:
        if inst.sec_type == "OPT":
            return 0.0
        return round(market.last_price(inst, cost_time) * inst.multiplier_value, 4)

    wanted: list[tuple[Instrument | None, float]] = []
    for sym, qty in (("AAPL", 100), ("MSFT", 50), ("SPY", 200)):
        found = universe.by_symbol(sym, "STK")
        wanted.append((found[0] if found else None, qty))
    wanted.append((universe.front_future("ES", today), 1))
    picks = [("AAPL", "C", 0, 5), ("AAPL", "P", -1, -3), ("SPY", "P", -1, 10), ("SPY", "C", 1, -2)]
    for sym, right, offset, qty in picks:
        keys = sorted(k for k in options if k[0] == sym and k[1] == expiries[0] and k[3] == right)
        if keys:
            wanted.append((options[keys[min(max(offset + 1, 0), len(keys) - 1)]], qty))
    for inst, qty in wanted:
        if inst is None:
            continue
        avg = cost(inst)
        if inst.sec_type == "OPT":
            spot = market.last_price(universe.by_symbol(inst.symbol, "STK")[0], cost_time)
            g = black_scholes(spot, inst.strike, option_years(inst, cost_time),
                              smile_vol(inst, spot), inst.right)
            avg = round(g.price * inst.multiplier_value, 4)
        universe.positions.append(Position(inst.con_id, float(qty), avg))
