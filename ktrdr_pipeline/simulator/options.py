"""Options in the simulator: Black–Scholes model Greeks in IB's conventions, and the
default option chains (AAPL and SPY near the money on the next two monthly expiries)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

from .market import MarketModel
from .universe import Instrument, Universe, option_contract, third_friday

RISK_FREE_RATE = 0.04
EASTERN = ZoneInfo("US/Eastern")
#: Option chains of the default universe: underlying symbol and strike step.
DEFAULT_CHAINS = (("AAPL", 5.0), ("SPY", 5.0))


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


def option_computation(inst: Instrument, now: datetime, und_price: float, *,
                       price: float | None = None, vol: float | None = None) -> OptionGreeks:
    """calculateOptionPrice (given ``vol``) or calculateImpliedVolatility (given ``price``:
    the volatility whose model price matches it, by bisection between 0.1 % and 500 %)."""
    if und_price <= 0:
        raise ValueError("the underlying price must be positive")
    years = option_years(inst, now)
    if vol is not None:
        return black_scholes(und_price, inst.strike, years, vol, inst.right)
    if price is None:
        raise ValueError("need an option price or a volatility")
    lo, hi = 0.001, 5.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if black_scholes(und_price, inst.strike, years, mid, inst.right).price < price:
            lo = mid
        else:
            hi = mid
    return black_scholes(und_price, inst.strike, years, (lo + hi) / 2, inst.right)


def smile_vol(inst: Instrument, spot: float) -> float:
    return inst.annual_vol + 0.15 * abs(math.log(inst.strike / spot))


def monthly_expiries(today: date, count: int = 2, min_days: int = 20) -> list[date]:
    """The next ``count`` monthly (third-Friday) expiries at least ``min_days`` away."""
    expiries: list[date] = []
    month, year = today.month, today.year
    while len(expiries) < count:
        exp = third_friday(year, month)
        if exp >= today + timedelta(days=min_days):
            expiries.append(exp)
        month, year = (1, year + 1) if month == 12 else (month + 1, year)
    return expiries


OptionKey = tuple[str, date, float, str]  # underlying symbol, expiry, strike, right


def add_default_options(universe: Universe, market: MarketModel,
                        now: datetime) -> tuple[list[date], dict[OptionKey, Instrument]]:
    """Calls and puts at the money and two strike steps either side, on the next two
    monthly expiries, for each default chain whose stock is in ``universe``."""
    expiries = monthly_expiries(now.date())
    options: dict[OptionKey, Instrument] = {}
    for sym, step in DEFAULT_CHAINS:
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
    return expiries, options
