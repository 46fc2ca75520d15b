"""Reference data the simulator answers from its own models: the account summary (from the
account book), matching symbols (from the universe), option chain parameters (from the
options in the universe), market rules and trading schedules (from the session calendar).

Each builder returns the messages, as field lists, that answer one request; the layouts are
those ib_async 2.1's decoder reads at server version 178
(``site-packages/ib_async/decoder.py``: accountSummary 63/64, symbolSamples 79,
securityDefinitionOptionParameter 75/76, marketRule 93, historicalSchedule 106).
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from ..domain import calendars
from .account import AccountBook
from .universe import Instrument, Universe

Message = list[object]

#: IB sends at most this many contract descriptions for one reqMatchingSymbols (TWS API
#: documentation, "Stock Contract Search", interactivebrokers.github.io/tws-api/
#: matching_symbols.html: "Up to 16 matching results are returned").
MAX_SYMBOL_SAMPLES = 16

#: The market rule every simulated instrument names (contract details' marketRuleIds) and
#: its price increments: one rule, 0.01 from price 0, as IB's rule 26 for US stocks.
MARKET_RULE_ID = 26


def account_summary(book: AccountBook, req_id: int, tags_text: str) -> list[Message]:
    """accountSummary rows for the requested tags (IB's ``$LEDGER`` tags and unknown tags
    are skipped, as IB skips what an account lacks), then accountSummaryEnd."""
    wanted = {t.strip() for t in tags_text.split(",") if t.strip()}
    acct = book.universe.account
    out: list[Message] = [
        [63, 1, req_id, acct, tag, value, currency]
        for tag, value, currency in book.values()
        if tag in wanted and tag not in ("AccountCode", "Currency")
    ]
    out.append([64, 1, req_id])
    return out


def matching_symbols(universe: Universe, req_id: int, pattern: str) -> Message:
    """symbolSamples for a search text: instruments whose symbol starts with it, then those
    whose name contains it (case-insensitive), one per symbol and security type; stocks
    list ``OPT`` among their derivatives when the universe has options on them."""
    text = pattern.strip().upper()
    by_key: dict[tuple[str, str], Instrument] = {}
    for inst in sorted(universe.instruments.values(), key=lambda i: (i.symbol, i.expiry)):
        if inst.sec_type == "OPT" or not text:
            continue
        if inst.symbol.startswith(text) or text in inst.long_name.upper():
            by_key.setdefault((inst.symbol, inst.sec_type), inst)
    ranked = sorted(by_key.values(),
                    key=lambda i: (not i.symbol.startswith(text), i.symbol, i.sec_type))
    optionable = {i.underlying for i in universe.instruments.values() if i.sec_type == "OPT"}
    fields: Message = [79, req_id, min(len(ranked), MAX_SYMBOL_SAMPLES)]
    for inst in ranked[:MAX_SYMBOL_SAMPLES]:
        derivatives = ["OPT"] if inst.sec_type == "STK" and inst.symbol in optionable else []
        fields += [inst.con_id, inst.symbol, inst.sec_type,
                   inst.primary_exchange or inst.exchange, inst.currency, len(derivatives),
                   *derivatives, inst.long_name, ""]
    return fields


def option_chain_params(universe: Universe, req_id: int, symbol: str, exchange: str,
                        sec_type: str, con_id: int) -> list[Message]:
    """securityDefinitionOptionParameter, one row per exchange listing the underlying's
    options (expirations and strikes), then its end; no rows when there are none."""
    underlying = universe.instruments.get(con_id)
    name = (underlying.symbol if underlying else symbol).upper()
    chains: dict[tuple[str, str, str], tuple[set[str], set[float]]] = defaultdict(
        lambda: (set(), set()))
    for inst in universe.instruments.values():
        if inst.sec_type != "OPT" or inst.underlying != name:
            continue
        if sec_type and underlying is not None and underlying.sec_type != sec_type.upper():
            continue
        for venue in (inst.valid_exchanges or inst.exchange).split(","):
            if exchange and venue != exchange.upper():
                continue
            expiries, strikes = chains[(venue, inst.trading_class, inst.multiplier)]
            expiries.add(inst.expiry)
            strikes.add(inst.strike)
    und_con_id = underlying.con_id if underlying else con_id
    out: list[Message] = []
    for (venue, tclass, mult), (expiries, strikes) in sorted(chains.items()):
        out.append([75, req_id, venue, und_con_id, tclass, mult, len(expiries),
                    *sorted(expiries), len(strikes), *sorted(strikes)])
    out.append([76, req_id])
    return out


def market_rule(rule_id: int) -> Message:
    """marketRule: the price increments of one rule (every simulated instrument trades in
    cents; futures and FX name their own tick in contract details' minTick)."""
    return [93, rule_id, 1, 0, 0.01]


def _ib_time(t: datetime, tz: ZoneInfo) -> str:
    return t.astimezone(tz).strftime("%Y%m%d-%H:%M:%S")


def historical_schedule(inst: Instrument, req_id: int, end: datetime, sessions: int,
                        use_rth: bool) -> Message:
    """historicalSchedule (whatToShow=SCHEDULE): the last ``sessions`` trading sessions
    opening before ``end``, in the instrument's time zone, with their reference dates
    (IB's sample output: ``Start: 20220616-09:30:00, End: 20220616-16:00:00, Ref Date:
    20220616``)."""
    profile = inst.profile
    tz = ZoneInfo(profile.tz)
    found = calendars.sessions_between(profile, end - timedelta(days=2 * sessions + 10), end,
                                       use_rth)
    found = [s for s in found if s.open < end][-sessions:]
    fields: Message = [106, req_id]
    if found:
        fields += [_ib_time(found[0].open, tz), _ib_time(found[-1].close, tz)]
    else:
        fields += ["", ""]
    fields += [profile.tz, len(found)]
    for s in found:
        fields += [_ib_time(s.open, tz), _ib_time(s.close, tz), s.date.strftime("%Y%m%d")]
    return fields
