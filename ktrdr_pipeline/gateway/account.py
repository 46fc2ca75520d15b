"""The simulator's clock, option pricing and paper account.

Both the socket server and the Client Portal server read positions, prices and Greeks
from one :class:`AccountBook`, so the two APIs always agree.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

from .market import MarketModel
from .universe import Instrument, Position, Universe, option_contract, third_friday

RISK_FREE_RATE = 0.04
EASTERN = ZoneInfo("US/Eastern")


class SimClock:
    """The market's current time: starts at ``start`` (default: real time) and advances
    in real time. Pacing and latency never use this clock, only real elapsed time."""

    def __init__(self, start: datetime | None = None):
        if start is not None and start.tzinfo is None:
            raise ValueError("the simulator clock needs a timezone-aware start time")
        self._start = start
        self._mono0 = time.monotonic()

    def now(self) -> datetime:
        if self._start is None:
            return datetime.now(UTC)
        return (self._start + timedelta(seconds=time.monotonic() - self._mono0)).astimezone(UTC)

    def shift(self, seconds: float) -> None:
        """Move the market clock (tests only); real-time pacing is unaffected."""
        self._start = self.now() + timedelta(seconds=seconds)
        self._mono0 = time.monotonic()


def _norm_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def _norm_pdf(x: float) -> float:
    return math.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


@dataclass(frozen=True)
class OptionGreeks:
    """Black–Scholes values in IB's conventions: vega per 1 vol point, theta per day."""

    implied_vol: float
    delta: float
    price: float
    gamma: float
    vega: float
    theta: float
    und_price: float


def black_scholes(spot: float, strike: float, years: float, vol: float, right: str,
                  rate: float = RISK_FREE_RATE) -> OptionGreeks:
    years = max(years, 1e-6)
    sq = vol * math.sqrt(years)
    d1 = (math.log(spot / strike) + (rate + 0.5 * vol * vol) * years) / sq
    d2 = d1 - sq
    disc = math.exp(-rate * years)
    if right == "C":
        price = spot * _norm_cdf(d1) - strike * disc * _norm_cdf(d2)
        delta = _norm_cdf(d1)
        theta_y = -spot * _norm_pdf(d1) * vol / (2 * math.sqrt(years)) - rate * strike * disc * _norm_cdf(d2)
    else:
        price = strike * disc * _norm_cdf(-d2) - spot * _norm_cdf(-d1)
        delta = _norm_cdf(d1) - 1.0
        theta_y = -spot * _norm_pdf(d1) * vol / (2 * math.sqrt(years)) + rate * strike * disc * _norm_cdf(-d2)
    gamma = _norm_pdf(d1) / (spot * sq)
    vega = spot * _norm_pdf(d1) * math.sqrt(years) / 100.0
    return OptionGreeks(vol, delta, price, gamma, vega, theta_y / 365.0, spot)


def option_years(inst: Instrument, now: datetime) -> float:
    exp = inst.expiry_date
    assert exp is not None
    expiry_close = datetime(exp.year, exp.month, exp.day, 16, 0, tzinfo=EASTERN)
    return max((expiry_close - now).total_seconds(), 0.0) / (365.0 * 86400)


def smile_vol(inst: Instrument, spot: float) -> float:
    return inst.annual_vol + 0.15 * abs(math.log(inst.strike / spot))


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
    expiries: list[date] = []
    month, year = today.month, today.year
    while len(expiries) < 2:
        exp = third_friday(year, month)
        if exp >= today + timedelta(days=20):
            expiries.append(exp)
        month, year = (1, year + 1) if month == 12 else (month + 1, year)
    options: dict[tuple[str, date, float, str], Instrument] = {}
    for sym, step in (("AAPL", 5.0), ("SPY", 5.0)):
        stocks = universe.by_symbol(sym, "STK")
        if not stocks:
            continue
        und = stocks[0]
        spot = market.last_price(und, now)
        atm = round(spot / step) * step
        for exp in expiries:
            for strike in (atm - 2 * step, atm, atm + 2 * step):
                for right in ("C", "P"):
                    opt = option_contract(und, exp, strike, right)
                    universe.add(opt)
                    options[(sym, exp, strike, right)] = opt
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
