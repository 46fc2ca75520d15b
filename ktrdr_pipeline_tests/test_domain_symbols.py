"""Symbols and storage keys (``domain/symbols.py``): one parser for what users type, one
rule for the keys that name stored files, one key for cached head timestamps."""

from __future__ import annotations

import pytest

from ktrdr_pipeline.domain.symbols import (
    SymbolError,
    check_storage_key,
    head_timestamp_cache_key,
    parse_symbol,
)


@pytest.mark.parametrize("text,key", [("aapl", "AAPL"), ("EUR/USD", "EURUSD"),
                                      ("ES:FUT:CME:USD:202612", "ES_FUT_202612"),
                                      ("BRK.B", "BRK.B")])
def test_every_parsed_symbol_has_a_valid_storage_key(text, key):
    spec = parse_symbol(text)
    assert spec.key == key and check_storage_key(spec.key) == key


@pytest.mark.parametrize("bad,why", [("aapl", "use 'AAPL'"), ("../etc", "'..'"),
                                     ("A/B", "path separators"), ("", "storage key")])
def test_a_storage_key_is_refused_with_what_is_allowed(bad, why):
    with pytest.raises(ValueError, match="invalid symbol") as info:
        check_storage_key(bad)
    assert why in str(info.value)


def test_symbol_errors_are_value_errors_naming_the_allowed_forms():
    with pytest.raises(SymbolError, match="allowed") as info:
        parse_symbol("AAPL;DROP")
    assert isinstance(info.value, ValueError)


def test_head_timestamp_cache_key():
    assert head_timestamp_cache_key(265598, "TRADES", True) == "265598|TRADES|1"
    assert head_timestamp_cache_key("12087792", "MIDPOINT", False) == "12087792|MIDPOINT|0"
