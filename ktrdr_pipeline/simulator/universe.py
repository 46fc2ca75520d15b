"""The simulator's instruments and paper account.

The default universe holds stocks, FX pairs, quarterly index futures and a few options.
Futures and options are generated relative to the simulator's clock at start, so a clock
in 2031 still sees a front future and unexpired options. A YAML file (``--universe``)
can replace the stocks, FX pairs and futures roots and the account's positions.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml

from ..domain import calendars

REFERENCE_DATE = date(2025, 1, 2)  # prices are anchored at this session
DEFAULT_ACCOUNT = "DU0000001"


@dataclass(frozen=True)
class Instrument:
    """One contract the simulator knows, with its market-model parameters."""

    con_id: int
    symbol: str
    sec_type: str  # STK, CASH, FUT, OPT
    exchange: str
    currency: str
    local_symbol: str
    trading_class: str
    primary_exchange: str = ""
    multiplier: str = ""
    expiry: str = ""  # YYYYMMDD for FUT and OPT
    strike: float = 0.0
    right: str = ""  # C or P for options
    long_name: str = ""
    head: datetime = datetime(2005, 1, 3, tzinfo=UTC)
    base_price: float = 100.0  # price at REFERENCE_DATE
    annual_vol: float = 0.25
    tick: float = 0.01
    volume_per_minute: float = 5000.0
    trade_size: int = 100
    underlying: str = ""  # for options: the underlying stock's symbol
    valid_exchanges: str = ""

    @property
    def profile(self) -> calendars.HoursProfile:
        return calendars.profile_for(self.sec_type, self.exchange, self.symbol)

    @property
    def multiplier_value(self) -> float:
        return float(self.multiplier) if self.multiplier else 1.0

    @property
    def expiry_date(self) -> date | None:
        return datetime.strptime(self.expiry, "%Y%m%d").date() if self.expiry else None


def stable_id(*parts: object) -> int:
    """A deterministic positive contract id from its describing parts."""
    return 100_000_000 + zlib.crc32("|".join(map(str, parts)).encode()) % 800_000_000


def _utc(d: str | date | datetime) -> datetime:
    if isinstance(d, datetime):
        return d if d.tzinfo else d.replace(tzinfo=UTC)
    if isinstance(d, str):
        d = date.fromisoformat(d)
    return datetime(d.year, d.month, d.day, tzinfo=UTC)


def _stock(con_id: int, symbol: str, primary: str, name: str, head: str, price: float,
           vol: float, vpm: float) -> Instrument:
    return Instrument(
        con_id=con_id, symbol=symbol, sec_type="STK", exchange="SMART", currency="USD",
        local_symbol=symbol, trading_class="NMS" if primary == "NASDAQ" else symbol,
        primary_exchange=primary, long_name=name, head=_utc(head), base_price=price,
        annual_vol=vol, tick=0.01, volume_per_minute=vpm, trade_size=100,
        valid_exchanges=f"SMART,{primary},ARCA,BATS,IEX",
    )


def _fx(con_id: int, pair: str, price: float, tick: float) -> Instrument:
    base, quote = pair[:3], pair[3:]
    return Instrument(
        con_id=con_id, symbol=base, sec_type="CASH", exchange="IDEALPRO", currency=quote,
        local_symbol=f"{base}.{quote}", trading_class=f"{base}.{quote}",
        long_name=f"{base} {quote}", head=_utc("2005-01-03"), base_price=price,
        annual_vol=0.08, tick=tick, volume_per_minute=0.0, trade_size=1,
        valid_exchanges="IDEALPRO",
    )


DEFAULT_STOCKS = [
    _stock(265598, "AAPL", "NASDAQ", "APPLE INC", "2005-01-03", 243.0, 0.28, 60000),
    _stock(272093, "MSFT", "NASDAQ", "MICROSOFT CORP", "2005-01-03", 418.0, 0.24, 30000),
    _stock(756733, "SPY", "ARCA", "SPDR S&P 500 ETF TRUST", "2005-01-03", 584.0, 0.16, 90000),
    _stock(76792991, "TSLA", "NASDAQ", "TESLA INC", "2010-06-29", 379.0, 0.60, 120000),
    _stock(4815747, "NVDA", "NASDAQ", "NVIDIA CORP", "2005-01-03", 138.0, 0.50, 300000),
    _stock(479624278, "RBLX", "NYSE", "ROBLOX CORP -CLASS A", "2021-03-10", 58.0, 0.55, 15000),
    # thin: about one lot a minute, so many minutes (most outside regular hours) see no
    # trade and have no TRADES bar, as with real illiquid names
    _stock(618034011, "ILLQ", "NYSE", "ILLIQUID DEMO CORP (SIMULATED)", "2015-06-01", 12.4,
           0.45, 1.2),
]
DEFAULT_FX = [
    _fx(12087792, "EURUSD", 1.0350, 0.00005),
    _fx(12087797, "GBPUSD", 1.2500, 0.00005),
    _fx(15016059, "USDJPY", 157.20, 0.005),
]


@dataclass(frozen=True)
class FutureRoot:
    symbol: str
    exchange: str
    multiplier: str
    long_name: str
    base_price: float
    annual_vol: float
    tick: float
    volume_per_minute: float


DEFAULT_FUTURE_ROOTS = [
    FutureRoot("ES", "CME", "50", "E-mini S&P 500", 5900.0, 0.16, 0.25, 1500),
    FutureRoot("NQ", "CME", "20", "E-mini NASDAQ 100", 21000.0, 0.20, 0.25, 500),
]
MONTH_CODES = {3: "H", 6: "M", 9: "U", 12: "Z"}


def third_friday(year: int, month: int) -> date:
    d = date(year, month, 15)
    return d + timedelta(days=(4 - d.weekday()) % 7)


def quarterly_expiries(around: date, back_years: int = 3, ahead_quarters: int = 4) -> list[date]:
    out = []
    for year in range(around.year - back_years, around.year + 2):
        for month in (3, 6, 9, 12):
            out.append(third_friday(year, month))
    upcoming = [d for d in out if d >= around][:ahead_quarters]
    return [d for d in out if d < around] + upcoming


def futures_for(root: FutureRoot, around: date) -> list[Instrument]:
    result = []
    for exp in quarterly_expiries(around):
        code = f"{root.symbol}{MONTH_CODES[exp.month]}{exp.year % 10}"
        result.append(Instrument(
            con_id=stable_id("FUT", root.symbol, exp.isoformat()), symbol=root.symbol,
            sec_type="FUT", exchange=root.exchange, currency="USD", local_symbol=code,
            trading_class=root.symbol, multiplier=root.multiplier, expiry=f"{exp:%Y%m%d}",
            long_name=root.long_name, head=_utc(exp - timedelta(days=400)),
            base_price=root.base_price, annual_vol=root.annual_vol, tick=root.tick,
            volume_per_minute=root.volume_per_minute, trade_size=1,
            valid_exchanges=root.exchange,
        ))
    return result


@dataclass(frozen=True)
class Position:
    con_id: int
    quantity: float
    avg_cost: float


@dataclass
class Universe:
    """Instruments by contract id, plus the paper account and its positions."""

    instruments: dict[int, Instrument]
    account: str = DEFAULT_ACCOUNT
    positions: list[Position] = field(default_factory=list)

    def add(self, inst: Instrument) -> None:
        self.instruments[inst.con_id] = inst

    def by_symbol(self, symbol: str, sec_type: str) -> list[Instrument]:
        return [i for i in self.instruments.values()
                if i.symbol == symbol and i.sec_type == sec_type]

    def front_future(self, symbol: str, today: date) -> Instrument | None:
        live = sorted((i for i in self.by_symbol(symbol, "FUT") if i.expiry_date >= today),
                      key=lambda i: i.expiry)
        return live[0] if live else None

    def match(self, query: dict[str, Any], include_expired: bool, today: date) -> list[Instrument]:
        """Instruments matching a contract description, as reqContractDetails would."""
        con_id = int(query.get("conId") or 0)
        if con_id:
            inst = self.instruments.get(con_id)
            found = [inst] if inst else []
        else:
            found = list(self.instruments.values())
            sym = (query.get("symbol") or "").upper()
            local = (query.get("localSymbol") or "").upper()
            if not sym and not local:
                return []
            if sym:
                found = [i for i in found if i.symbol == sym]
            if local:
                found = [i for i in found if i.local_symbol.upper() == local]
            sec_type = (query.get("secType") or "").upper()
            if sec_type:
                found = [i for i in found if i.sec_type == sec_type]
            exchange = (query.get("exchange") or "").upper()
            if exchange:
                found = [i for i in found if exchange in (i.exchange, i.primary_exchange)
                         or exchange in i.valid_exchanges.split(",")]
            primary = (query.get("primaryExchange") or "").upper()
            if primary:
                found = [i for i in found if i.primary_exchange in ("", primary)]
            currency = (query.get("currency") or "").upper()
            if currency:
                found = [i for i in found if i.currency == currency]
            expiry = query.get("lastTradeDateOrContractMonth") or ""
            if expiry:
                found = [i for i in found if i.expiry.startswith(expiry)]
            strike = float(query.get("strike") or 0.0)
            if strike:
                found = [i for i in found if abs(i.strike - strike) < 1e-9]
            right = (query.get("right") or "").upper()[:1]
            if right:
                found = [i for i in found if i.right == right]
            tclass = (query.get("tradingClass") or "").upper()
            if tclass:
                found = [i for i in found if i.trading_class.upper() == tclass]
            mult = query.get("multiplier") or ""
            if mult:
                found = [i for i in found if i.multiplier == str(mult).rstrip("0").rstrip(".")
                         or i.multiplier == str(mult)]
        if not include_expired:
            found = [i for i in found if i.expiry_date is None or i.expiry_date >= today]
        return sorted(found, key=lambda i: (i.sec_type, i.expiry, i.strike, i.right))


def _load_yaml(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"cannot read universe file {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"universe file {path} must be a mapping with 'stocks', 'fx', ...")
    return raw


def build_universe(today: date, path: Path | None = None) -> Universe:
    """The default universe, or one read from a YAML file (see ``docs`` in the README).

    Options are added later by the market model, which knows the underlying prices.
    """
    stocks, fx, roots = DEFAULT_STOCKS, DEFAULT_FX, DEFAULT_FUTURE_ROOTS
    account = DEFAULT_ACCOUNT
    if path is not None:
        raw = _load_yaml(path)
        account = str(raw.get("account", DEFAULT_ACCOUNT))
        try:
            stocks = [
                _stock(int(s.get("con_id") or stable_id("STK", s["symbol"])), s["symbol"].upper(),
                       s.get("primary_exchange", "NYSE"), s.get("name", s["symbol"]),
                       str(s.get("head", "2005-01-03")), float(s.get("price", 100.0)),
                       float(s.get("vol", 0.3)), float(s.get("volume_per_minute", 10000)))
                for s in raw.get("stocks", [])
            ]
            fx = [
                _fx(int(p.get("con_id") or stable_id("CASH", p["pair"])), p["pair"].upper(),
                    float(p.get("price", 1.0)), float(p.get("tick", 0.00005)))
                for p in raw.get("fx", [])
            ]
            roots = [
                FutureRoot(f["symbol"].upper(), f.get("exchange", "CME"),
                           str(f.get("multiplier", "50")), f.get("name", f["symbol"]),
                           float(f.get("price", 1000.0)), float(f.get("vol", 0.2)),
                           float(f.get("tick", 0.25)), float(f.get("volume_per_minute", 500)))
                for f in raw.get("futures", [])
            ]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"invalid entry in universe file {path}: {exc!r}") from exc
        for inst in stocks:
            if inst.head.date() < date.fromisoformat(calendars.SCHEDULE_START):
                raise ValueError(f"{inst.symbol}: head must be on or after "
                                 f"{calendars.SCHEDULE_START}")
    universe = Universe({}, account=account)
    for inst in [*stocks, *fx]:
        universe.add(inst)
    for root in roots:
        for inst in futures_for(root, today):
            universe.add(inst)
    return universe


def option_contract(underlying: Instrument, expiry: date, strike: float, right: str) -> Instrument:
    """An equity option on ``underlying`` (American style, 100 multiplier)."""
    local = f"{underlying.symbol:<6}{expiry:%y%m%d}{right}{int(round(strike * 1000)):08d}"
    return replace(
        Instrument(
            con_id=stable_id("OPT", underlying.symbol, expiry.isoformat(), strike, right),
            symbol=underlying.symbol, sec_type="OPT", exchange="SMART", currency="USD",
            local_symbol=local, trading_class=underlying.symbol, multiplier="100",
            expiry=f"{expiry:%Y%m%d}", strike=strike, right=right,
            long_name=f"{underlying.long_name} option", head=_utc(expiry - timedelta(days=270)),
            base_price=underlying.base_price, annual_vol=underlying.annual_vol, tick=0.01,
            volume_per_minute=50, trade_size=1, underlying=underlying.symbol,
            valid_exchanges="SMART,CBOE,AMEX,ISE",
        ),
    )
