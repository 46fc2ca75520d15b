"""Every message ib_async 2.1 can send gets an answer from the simulator — data, or IB's
error for that request — so no client waits for something that never comes
(``docs/ib-facts.md`` §3: a request that gets neither is a stall). Also: the faithful
answers (account summary, matching symbols, option chain parameters, trading schedule),
the refused ones (orders), and the handshake of clients offering older versions (§7)."""

from __future__ import annotations

import re
import socket
import struct
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import ib_async
import pytest
from ib_async import (
    IB,
    Contract,
    ExecutionFilter,
    LimitOrder,
    MarketOrder,
    ScannerSubscription,
    Stock,
    WshEventData,
)

from ktrdr_pipeline.simulator import refusals
from ktrdr_pipeline.simulator.protocol import SERVER_VERSION, encode

from .conftest import connect, wait_until

ACCT = "DU0000001"
AAPL = Contract(conId=265598, symbol="AAPL", secType="STK", exchange="SMART", currency="USD")
END = "20261117 16:00:00 US/Eastern"


def outgoing_message_ids() -> set[int]:
    """The message ids ib_async's ``Client`` can send, read from its source."""
    src = (Path(ib_async.__file__).parent / "client.py").read_text()
    ids = re.findall(r"self\.send\(\s*(\d+)", src) + re.findall(r"fields\s*=\s*\[\s*(\d+)", src)
    return {int(x) for x in ids}


class Incoming:
    """Every message the client receives, as raw fields (wrapping ib_async's decoder)."""

    def __init__(self, ib: IB):
        self.messages: list[list[str]] = []
        decoder = ib.client.decoder
        original = decoder.interpret

        def interpret(fields):
            self.messages.append(list(fields))
            original(fields)

        decoder.interpret = interpret


Answer = Callable[[list[str]], bool]


def msg(msg_id: int, req_id: int | None = None, at: int = 1) -> Answer:
    """A message ``msg_id`` (with ``req_id`` in field ``at``) or an error for ``req_id``."""
    def answered(f: list[str]) -> bool:
        if f[0] == "4" and req_id is not None and f[2] == str(req_id):
            return True
        return f[0] == str(msg_id) and (req_id is None or f[at] == str(req_id))
    return answered


def error(req_id: int, code: int) -> Answer:
    return lambda f: f[0] == "4" and f[2] == str(req_id) and f[3] == str(code)


def _calls(option: Contract) -> dict[int, tuple[Callable, Answer]]:
    """For each request message id: how ib_async sends it, and what answers it."""
    what_if = MarketOrder("BUY", 1)
    what_if.whatIf = True
    return {
        1: (lambda c: c.reqMktData(1, AAPL, "", True, False, []), msg(57, 1, 2)),
        3: (lambda c: c.placeOrder(3, AAPL, LimitOrder("BUY", 1, 1.0)),
            error(3, refusals.ORDER_REJECTED)),
        4: (lambda c: c.cancelOrder(4, ""), error(4, refusals.CANCEL_NOT_FOUND)),
        5: (lambda c: c.reqOpenOrders(), msg(53)),
        6: (lambda c: c.reqAccountUpdates(True, ACCT), msg(54)),
        7: (lambda c: c.reqExecutions(7, ExecutionFilter()), msg(55, 7, 2)),
        8: (lambda c: c.reqIds(1), msg(9)),
        9: (lambda c: c.reqContractDetails(9, AAPL), msg(52, 9, 2)),
        10: (lambda c: c.reqMktDepth(10, AAPL, 5, False, []), error(10, 354)),
        16: (lambda c: c.reqAllOpenOrders(), msg(53)),
        17: (lambda c: c.reqManagedAccts(), msg(15)),
        18: (lambda c: c.requestFA(1), error(-1, 321)),
        19: (lambda c: c.replaceFA(19, 1, "<ListOfGroups/>"), error(19, 321)),
        20: (lambda c: c.reqHistoricalData(20, AAPL, END, "3600 S", "1 min", "TRADES", 1, 2,
                                           False, []), msg(17, 20)),
        21: (lambda c: c.exerciseOptions(21, option, 1, 1, ACCT, 0),
             error(21, refusals.ORDER_REJECTED)),
        22: (lambda c: c.reqScannerSubscription(22, ScannerSubscription(
            instrument="STK", locationCode="STK.US.MAJOR", scanCode="TOP_PERC_GAIN"), [], []),
             error(22, 354)),
        24: (lambda c: c.reqScannerParameters(), msg(19)),
        49: (lambda c: c.reqCurrentTime(), msg(49)),
        50: (lambda c: c.reqRealTimeBars(50, AAPL, 5, "TRADES", True, []), error(50, 354)),
        52: (lambda c: c.reqFundamentalData(52, AAPL, "ReportSnapshot", []), error(52, 430)),
        54: (lambda c: c.calculateImpliedVolatility(54, option, 5.0, 230.0, []), msg(21, 54)),
        55: (lambda c: c.calculateOptionPrice(55, option, 0.3, 230.0, []), msg(21, 55)),
        61: (lambda c: c.reqPositions(), msg(62)),
        62: (lambda c: c.reqAccountSummary(62, "All", "NetLiquidation"), msg(64, 62, 2)),
        65: (lambda c: c.verifyRequest("app", "1"), msg(66)),
        66: (lambda c: c.verifyMessage("data"), msg(66)),
        67: (lambda c: c.queryDisplayGroups(67), msg(67, 67, 2)),
        68: (lambda c: c.subscribeToGroupEvents(68, 1), msg(68, 68, 2)),
        69: (lambda c: c.updateDisplayGroup(69, "265598@SMART"), msg(68, 69, 2)),
        72: (lambda c: c.verifyAndAuthRequest("app", "1", "key"), msg(70)),
        73: (lambda c: c.verifyAndAuthMessage("data", "response"), msg(70)),
        74: (lambda c: c.reqPositionsMulti(74, ACCT, ""), msg(72, 74, 2)),
        76: (lambda c: c.reqAccountUpdatesMulti(76, ACCT, "", False), msg(74, 76, 2)),
        78: (lambda c: c.reqSecDefOptParams(78, "AAPL", "", "STK", 265598), msg(76, 78)),
        79: (lambda c: c.reqSoftDollarTiers(79), msg(77, 79)),
        80: (lambda c: c.reqFamilyCodes(), msg(78)),
        81: (lambda c: c.reqMatchingSymbols(81, "AA"), msg(79, 81)),
        82: (lambda c: c.reqMktDepthExchanges(), msg(80)),
        83: (lambda c: c.reqSmartComponents(83, "a6"), msg(82, 83)),
        84: (lambda c: c.reqNewsArticle(84, "BZ", "BZ$1", []), error(84, 10276)),
        85: (lambda c: c.reqNewsProviders(), msg(85)),
        86: (lambda c: c.reqHistoricalNews(86, 265598, "BZ", "", "", 10, []), error(86, 10276)),
        87: (lambda c: c.reqHeadTimeStamp(87, AAPL, "TRADES", True, 2), msg(88, 87)),
        88: (lambda c: c.reqHistogramData(88, AAPL, True, "1 week"), error(88, 354)),
        91: (lambda c: c.reqMarketRule(26), msg(93, 26)),
        92: (lambda c: c.reqPnL(92, ACCT, ""), msg(94, 92)),
        94: (lambda c: c.reqPnLSingle(94, ACCT, "", 265598), msg(95, 94)),
        96: (lambda c: c.reqHistoricalTicks(96, AAPL, "", END, 100, "TRADES", 1, False, []),
             error(96, 354)),
        97: (lambda c: c.reqTickByTickData(97, AAPL, "Last", 0, False), error(97, 354)),
        99: (lambda c: c.reqCompletedOrders(False), msg(102)),
        100: (lambda c: c.reqWshMetaData(100), error(100, 10276)),
        102: (lambda c: c.reqWshEventData(102, WshEventData(conId=265598)), error(102, 10276)),
        104: (lambda c: c.reqUserInfo(104), msg(107, 104)),
    }


def test_every_message_ib_async_can_send_is_answered(gateway):
    ib = connect(gateway)
    try:
        option = ib.reqContractDetails(Contract(symbol="AAPL", secType="OPT", exchange="SMART",
                                                currency="USD"))[0].contract
        calls = _calls(option)
        # every message ib_async can send is either tried here, answered by nothing at IB
        # either (cancels and settings), or startApi (sent by connect)
        assert outgoing_message_ids() == set(calls) | set(refusals.UNANSWERED) | {71}
        incoming = Incoming(ib)
        unanswered = []
        for msg_id, (send, answered) in sorted(calls.items()):
            seen = len(incoming.messages)
            send(ib.client)
            try:
                wait_until(lambda a=answered, s=seen: any(a(f) for f in incoming.messages[s:]),
                           f"an answer to message {msg_id}", deadline=10, sleep=ib.sleep)
            except AssertionError:
                unanswered.append(msg_id)
        assert unanswered == []
        # the what-if variant of an order is refused the same way
        what_if = MarketOrder("BUY", 1)
        what_if.whatIf = True
        ib.client.placeOrder(300, AAPL, what_if)
        wait_until(lambda: any(error(300, 201)(f) for f in incoming.messages),
                   "201 for a what-if order", sleep=ib.sleep)
    finally:
        ib.disconnect()


def test_refusals_carry_ibs_codes_and_end_the_request(gateway):
    ib = connect(gateway)
    ib.RaiseRequestErrors = True
    try:
        with pytest.raises(ib_async.RequestError) as info:
            ib.whatIfOrder(Stock("AAPL", "SMART", "USD"), MarketOrder("BUY", 1))
        assert info.value.code == 201 and "Order rejected - reason:" in info.value.message
        trade = ib.placeOrder(Stock("AAPL", "SMART", "USD"), LimitOrder("BUY", 1, 1.0))
        wait_until(lambda: trade.isDone(), "the order is cancelled by IB's 201",
                   sleep=ib.sleep)
        assert trade.orderStatus.status == "Cancelled"
        assert any(e.errorCode == 201 for e in trade.log)
        with pytest.raises(ib_async.RequestError) as info:
            ib.reqFundamentalData(Stock("AAPL", "SMART", "USD"), "ReportSnapshot")
        assert info.value.code == 430
    finally:
        ib.disconnect()


def test_account_summary_from_the_account_model(gateway):
    ib = connect(gateway)
    try:
        summary = ib.accountSummary()
        tags = {v.tag: v for v in summary}
        assert {"NetLiquidation", "TotalCashValue", "BuyingPower", "AvailableFunds",
                "MaintMarginReq", "AccountType"} <= set(tags)
        assert all(v.account == ACCT for v in summary)
        values = {v.tag: v.value for v in ib.accountValues()}  # reqAccountUpdates agrees
        assert tags["NetLiquidation"].value == values["NetLiquidation"]
        assert float(tags["NetLiquidation"].value) > 0
    finally:
        ib.disconnect()


def test_matching_symbols_from_the_universe(gateway):
    ib = connect(gateway)
    try:
        found = ib.reqMatchingSymbols("AAP")
        assert [d.contract.symbol for d in found][:1] == ["AAPL"]
        assert found[0].contract.conId == 265598 and "OPT" in found[0].derivativeSecTypes
        by_name = ib.reqMatchingSymbols("Apple")
        assert "AAPL" in [d.contract.symbol for d in by_name]
        assert ib.reqMatchingSymbols("ZZZZZ") == []
    finally:
        ib.disconnect()


def test_option_chain_parameters_from_the_option_model(gateway):
    ib = connect(gateway)
    try:
        options = ib.reqContractDetails(Contract(symbol="AAPL", secType="OPT",
                                                 exchange="SMART", currency="USD"))
        chains = ib.reqSecDefOptParams("AAPL", "", "STK", 265598)
        smart = [c for c in chains if c.exchange == "SMART"]
        assert len(smart) == 1
        assert set(smart[0].expirations) == {cd.contract.lastTradeDateOrContractMonth
                                             for cd in options}
        assert set(smart[0].strikes) == {cd.contract.strike for cd in options}
        assert smart[0].multiplier == "100" and smart[0].tradingClass == "AAPL"
        assert ib.reqSecDefOptParams("MSFT", "", "STK", 0) == []  # no options listed
    finally:
        ib.disconnect()


def test_option_calculations_invert_each_other(gateway):
    ib = connect(gateway)
    try:
        option = ib.reqContractDetails(Contract(symbol="AAPL", secType="OPT",
                                                exchange="SMART", currency="USD"))[0].contract
        priced = ib.calculateOptionPrice(option, 0.3, 230.0)
        assert priced is not None and priced.optPrice > 0
        implied = ib.calculateImpliedVolatility(option, priced.optPrice, 230.0)
        assert implied.impliedVol == pytest.approx(0.3, abs=1e-4)
    finally:
        ib.disconnect()


def test_schedule_from_the_session_calendar(gateway):
    ib = connect(gateway)
    try:
        end = datetime(2025, 1, 10, 21, 0, tzinfo=UTC)  # Friday 16:00 US/Eastern
        schedule = ib.reqHistoricalSchedule(Stock("AAPL", "SMART", "USD"), 5, end, True)
        assert schedule.timeZone == "US/Eastern"
        # Jan 9, 2025 was a market closure (President Carter's day of mourning)
        assert [s.refDate for s in schedule.sessions] == [
            "20250103", "20250106", "20250107", "20250108", "20250110"]
        assert schedule.sessions[0].startDateTime == "20250103-09:30:00"
        assert schedule.sessions[-1].endDateTime == "20250110-16:00:00"
    finally:
        ib.disconnect()


# -- older clients (§7) ----------------------------------------------------------------------

def _handshake(port: int, versions: bytes) -> tuple[list[list[str]], bool]:
    """Offer ``versions`` (e.g. b"v100..157") and start the API; return what the server
    sent and whether it closed the connection."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        sock.sendall(b"API\0" + struct.pack(">I", len(versions)) + versions)
        buf, messages = b"", []
        sent_start = False
        while True:
            while len(buf) >= 4 and len(buf) >= 4 + struct.unpack(">I", buf[:4])[0]:
                size = struct.unpack(">I", buf[:4])[0]
                messages.append(buf[4:4 + size].decode().split("\0")[:-1])
                buf = buf[4 + size:]
            if messages and not sent_start:
                sock.sendall(encode([71, 2, 555, ""]))
                sent_start = True
            if any(m[0] == "9" for m in messages):  # nextValidId: the API started
                return messages, False
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                return messages, False
            if not chunk:
                return messages, True
            buf += chunk
    finally:
        sock.close()


@pytest.mark.parametrize("versions", [b"v100..157", b"v100..151", b"v157..177"])
def test_a_client_below_version_178_is_refused_clearly(gateway, versions):
    messages, closed = _handshake(gateway.port, versions)
    hi = int(versions.split(b"..")[1])
    # the handshake answer is the negotiated version, so the client can read what follows
    assert messages[0][0] == str(hi)
    errors = [m for m in messages if m[0] == "4"]
    assert errors and errors[0][2] == "-1" and errors[0][3] == "503"
    assert f"version {hi}" in errors[0][4] and str(SERVER_VERSION) in errors[0][4]
    assert closed and not any(m[0] == "9" for m in messages)


def test_a_client_offering_178_or_more_gets_178(gateway):
    messages, closed = _handshake(gateway.port, b"v157..187")
    assert messages[0][0] == str(SERVER_VERSION) and not closed
    assert any(m[0] == "9" for m in messages)
