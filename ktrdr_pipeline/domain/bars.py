"""The bar frame and the record kept with each stored partition (pure).

A *bar frame* is a pandas DataFrame indexed by the UTC bar start ``ts`` (daily and larger
bars: the session date at 00:00 UTC) with the columns :data:`BAR_COLUMNS`. The fetcher
builds it from IB's answers, the store writes and reads it, validation checks it.

:class:`PartitionMeta` is what the store writes next to a partition's bars (the Parquet
file's key-value metadata) and what the loader, the checks and the sensors read back:
typed once here instead of parsed from a dict wherever it is used.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import UTC
from typing import Any

import pandas as pd

BAR_COLUMNS = ["open", "high", "low", "close", "volume", "wap", "bar_count"]

#: Version of the metadata layout written with each partition.
FORMAT_VERSION = 1


def empty_bars() -> pd.DataFrame:
    """A bar frame with no bars (the right columns, dtypes and index)."""
    frame = pd.DataFrame({c: pd.Series(dtype="float64") for c in BAR_COLUMNS})
    frame["bar_count"] = frame["bar_count"].astype("int64")
    frame.index = pd.DatetimeIndex([], tz=UTC, name="ts")
    return frame


@dataclass(frozen=True)
class FetchState:
    """What a load learnt from IB about a partition, kept with its bars.

    ``partial_from``: start (epoch s) of the stored bar that was still in progress when
    fetched; ``asked_until``: up to when IB was last asked; ``empty_runs``: spans of
    expected bars IB answered without a bar (a thin stock's minutes without a trade).
    """

    con_id: str | None = None
    fetched_at: str | None = None
    partial_from: int | None = None
    asked_until: int | None = None
    empty_runs: tuple[tuple[int, int], ...] = ()  # sorted, disjoint (gaps.Runs)

    def as_meta(self) -> dict[str, Any]:
        """The JSON form written to the file (the layout readers of version 1 expect)."""
        return {
            "con_id": self.con_id,
            "fetched_at": self.fetched_at,
            "partial_from": "" if self.partial_from is None else str(self.partial_from),
            "asked_until": self.asked_until,
            "empty_runs": [list(r) for r in self.empty_runs],
        }


@dataclass(frozen=True)
class PartitionMeta:
    """The metadata of one stored partition: what it holds and how it was fetched."""

    timeframe: str
    symbol: str
    period: str
    use_rth: bool
    what_to_show: str
    rows: int = 0
    written_at: str | None = None
    format_version: int = FORMAT_VERSION
    fetch: FetchState = field(default_factory=FetchState)
    #: Keys this record does not know (written by other tools), kept as they are.
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def partial_from(self) -> int | None:
        return self.fetch.partial_from

    @property
    def asked_until(self) -> int | None:
        return self.fetch.asked_until

    @property
    def empty_runs(self) -> tuple[tuple[int, int], ...]:
        return self.fetch.empty_runs

    @property
    def con_id(self) -> str | None:
        return self.fetch.con_id

    @property
    def fetched_at(self) -> str | None:
        return self.fetch.fetched_at

    def to_json(self) -> dict[str, Any]:
        """The JSON object stored in the file (``from_json`` reads it back)."""
        own = {f.name: getattr(self, f.name) for f in fields(self)
               if f.name not in ("fetch", "extra")}
        fetched = {k: v for k, v in self.fetch.as_meta().items()
                   if v not in (None, "", [])} if self.fetch != FetchState() else {}
        return {**self.extra, **fetched, **own}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> PartitionMeta:
        """Parse what a store wrote (any version-1 file, also ones written by hand)."""
        known = {f.name for f in fields(cls)} | {f.name for f in fields(FetchState)}
        fetch = FetchState(
            con_id=_text(raw.get("con_id")),
            fetched_at=_text(raw.get("fetched_at")),
            partial_from=_int(raw.get("partial_from")),
            asked_until=_int(raw.get("asked_until")),
            empty_runs=tuple(sorted((int(a), int(b)) for a, b in raw.get("empty_runs") or ())),
        )
        return cls(
            timeframe=str(raw.get("timeframe", "")),
            symbol=str(raw.get("symbol", "")),
            period=str(raw.get("period", "")),
            use_rth=_bool(raw.get("use_rth")),
            what_to_show=str(raw.get("what_to_show") or "TRADES"),
            rows=int(raw.get("rows") or 0),
            written_at=_text(raw.get("written_at")),
            format_version=int(raw.get("format_version") or FORMAT_VERSION),
            fetch=fetch,
            extra={k: v for k, v in raw.items() if k not in known},
        )


def fetch_state(meta: PartitionMeta | None) -> FetchState:
    """What is known of a partition's fetches (nothing when it was never written)."""
    return meta.fetch if meta is not None else FetchState()


def _text(value: Any) -> str | None:
    return None if value in (None, "", "None") else str(value)


def _int(value: Any) -> int | None:
    return None if value in (None, "", "None") else int(value)


def _bool(value: Any) -> bool:
    return str(value).lower() in ("true", "1")
