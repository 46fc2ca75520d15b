"""The requests the simulator does not serve with data, and the IB error each one gets.

A gateway answers every request it receives (``docs/ib-facts.md`` §3: a request that gets
neither data nor an error is a stall). For what this simulator does not model it answers as
IB answers an account without that service, with IB's code and text, for the request's id,
using codes ib_async 2.1 treats as errors (so the request ends at once instead of waiting
for a timeout). The codes and texts, from IB's message-code list as quoted in public code:

* 201 "Order rejected - reason:…" — the simulator never trades (orders, what-if orders and
  option exercises alike);
* 10147 "OrderId N that needs to be cancelled is not found." — a cancel of an order it
  never took;
* 354 "Requested market data is not subscribed." — data streams it does not model
  (market depth, real-time bars, tick-by-tick, scanners, histograms, historical ticks);
* 430 "We are sorry, but fundamentals data for the security specified is not available.";
* 10276 "News feed is not allowed." — news and Wall Street Horizon requests (IB's docs:
  "not permissioned for receiving WSH news feed");
* 321 "…FA data operations ignored for non FA customers." — the paper account is not a
  financial advisor's (IB answers requestFA with request id -1).

Messages IB itself never answers (cancels, log level, market data type, news bulletin and
auto-open-order subscriptions) are listed in :data:`UNANSWERED`.
"""

from __future__ import annotations

from dataclasses import dataclass

ORDER_REJECTED = 201
CANCEL_NOT_FOUND = 10147
NOT_SUBSCRIBED = 354
NO_FUNDAMENTALS = 430
NEWS_NOT_ALLOWED = 10276
VALIDATION = 321

MSG_ORDER_REJECTED = ("Order rejected - reason:This IB Gateway simulator serves market data "
                      "only and accepts no orders")
MSG_NOT_SUBSCRIBED = "Requested market data is not subscribed."
MSG_NO_FUNDAMENTALS = ("We are sorry, but fundamentals data for the security specified is not "
                       "available.")
MSG_NEWS_NOT_ALLOWED = "News feed is not allowed."
MSG_NOT_FA = ("Error validating request.-'b9' : cause - FA data operations ignored for non FA "
              "customers.")


def cancel_not_found(order_id: int) -> str:
    return f"OrderId {order_id} that needs to be cancelled is not found."


@dataclass(frozen=True)
class Refusal:
    """How one request is refused: ib_async's name for it, where its request id is in the
    message (None: the error carries -1), IB's code and text, and what the simulator lacks
    (appended to IB's text so a user knows it is the simulator's limit)."""

    request: str
    req_id_field: int | None
    code: int
    text: str
    lacks: str = ""

    def message(self) -> str:
        return f"{self.text} ({self.lacks})" if self.lacks else self.text


#: Refused requests by message id (client → server, ib_async 2.1 ``client.py``).
REFUSALS: dict[int, Refusal] = {
    3: Refusal("placeOrder", 1, ORDER_REJECTED, MSG_ORDER_REJECTED),
    10: Refusal("reqMktDepth", 2, NOT_SUBSCRIBED, MSG_NOT_SUBSCRIBED,
                "the simulator has no market depth"),
    18: Refusal("requestFA", None, VALIDATION, MSG_NOT_FA),
    19: Refusal("replaceFA", 4, VALIDATION, MSG_NOT_FA),
    21: Refusal("exerciseOptions", 2, ORDER_REJECTED, MSG_ORDER_REJECTED),
    22: Refusal("reqScannerSubscription", 1, NOT_SUBSCRIBED, MSG_NOT_SUBSCRIBED,
                "the simulator has no market scanners"),
    50: Refusal("reqRealTimeBars", 2, NOT_SUBSCRIBED, MSG_NOT_SUBSCRIBED,
                "the simulator has no real-time bars"),
    52: Refusal("reqFundamentalData", 2, NO_FUNDAMENTALS, MSG_NO_FUNDAMENTALS,
                "the simulator has no fundamentals"),
    84: Refusal("reqNewsArticle", 1, NEWS_NOT_ALLOWED, MSG_NEWS_NOT_ALLOWED),
    86: Refusal("reqHistoricalNews", 1, NEWS_NOT_ALLOWED, MSG_NEWS_NOT_ALLOWED),
    88: Refusal("reqHistogramData", 1, NOT_SUBSCRIBED, MSG_NOT_SUBSCRIBED,
                "the simulator has no histograms"),
    96: Refusal("reqHistoricalTicks", 1, NOT_SUBSCRIBED, MSG_NOT_SUBSCRIBED,
                "the simulator has no historical ticks"),
    97: Refusal("reqTickByTickData", 1, NOT_SUBSCRIBED, MSG_NOT_SUBSCRIBED,
                "the simulator has no tick-by-tick data"),
    100: Refusal("reqWshMetaData", 1, NEWS_NOT_ALLOWED, MSG_NEWS_NOT_ALLOWED),
    102: Refusal("reqWshEventData", 1, NEWS_NOT_ALLOWED, MSG_NEWS_NOT_ALLOWED),
}

#: Messages IB answers with nothing (a cancel is not confirmed; the others set state or
#: subscribe to events that may never come), by message id.
UNANSWERED: dict[int, str] = {
    2: "cancelMktData", 11: "cancelMktDepth", 12: "reqNewsBulletins",
    13: "cancelNewsBulletins", 14: "setServerLogLevel", 15: "reqAutoOpenOrders",
    23: "cancelScannerSubscription", 25: "cancelHistoricalData", 51: "cancelRealTimeBars",
    53: "cancelFundamentalData", 56: "cancelCalculateImpliedVolatility",
    57: "cancelCalculateOptionPrice", 58: "reqGlobalCancel", 59: "reqMarketDataType",
    63: "cancelAccountSummary", 64: "cancelPositions", 70: "unsubscribeFromGroupEvents",
    75: "cancelPositionsMulti", 77: "cancelAccountUpdatesMulti", 89: "cancelHistogramData",
    90: "cancelHeadTimeStamp", 93: "cancelPnL", 95: "cancelPnLSingle",
    98: "cancelTickByTickData", 101: "cancelWshMetaData", 103: "cancelWshEventData",
}
