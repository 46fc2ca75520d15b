"""Timeframe names as users type them (``domain/timeframes.py``)."""

from __future__ import annotations

import pytest


def test_timeframes_are_case_insensitive_where_unambiguous():
    from ktrdr_pipeline.cli import build_parser
    from ktrdr_pipeline.domain.timeframes import get_timeframe

    assert get_timeframe("1H").name == "1h" and get_timeframe(" 1D ").name == "1d"
    assert get_timeframe("1MO").name == "1mo" and get_timeframe("1m").name == "1m"
    for text in ("1M", "5M"):  # minutes to some, months to others: refused, both named
        with pytest.raises(ValueError, match=r"ambiguous.*m for minutes.*mo for months"):
            get_timeframe(text)
    with pytest.raises(ValueError, match="unknown timeframe '7x'; allowed: 1s"):
        get_timeframe("7x")
    args = build_parser().parse_args(["load", "AAPL", "--timeframe", "1H"])
    assert args.timeframe == "1h"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["load", "AAPL", "--timeframe", "1M"])
