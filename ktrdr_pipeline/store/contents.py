"""What the store holds, for readers that must start fast: the manifest's answers without
the Parquet layer's imports (pandas, pyarrow) when it can be read as it is, else through
:class:`~.parquet.BarStore`, which repairs or rebuilds it from the files first.

Kept apart from :mod:`.manifest` (which :mod:`.parquet` imports) so that the fallback's
import of :mod:`.parquet` makes no cycle.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .manifest import MANIFEST_FILE, CoverageRow, ManifestEntry, SqliteManifest


def _settled(data_dir: Path | str) -> SqliteManifest | None:
    """The data directory's manifest when it can be read as it is (complete, no write in
    flight); None when the Parquet layer must repair or rebuild it first."""
    manifest = SqliteManifest(Path(data_dir) / MANIFEST_FILE)
    return manifest if manifest.complete() and not manifest.intents() else None


def read_entries(data_dir: Path | str, timeframe: str | None = None,
                 symbol: str | None = None,
                 periods: Sequence[str] | None = None) -> list[ManifestEntry]:
    """The stored partitions (of ``timeframe``/``symbol``/``periods`` when given) with their
    files (``entry.path``, relative to ``data_dir``), for readers that must not import the
    Parquet layer (the ``sql`` command's start-up): one query when the manifest is settled,
    else :meth:`~.parquet.BarStore.entries`, which repairs or rebuilds it first. Arguments
    are not validated here beyond what SQL parameters need: unknown names match nothing."""
    manifest = _settled(data_dir)
    if manifest is not None:
        return manifest.scan(timeframe, symbol, periods)
    from .parquet import BarStore

    return BarStore(data_dir).entries(timeframe, symbol, list(periods) if periods else periods)


def read_coverage(data_dir: Path | str) -> list[CoverageRow]:
    """The store's coverage (:meth:`SqliteManifest.coverage`) without the Parquet layer's
    imports when the manifest is complete and no write is in flight (the usual case: one
    query); otherwise through :meth:`~.parquet.BarStore.coverage`, which repairs or rebuilds
    the manifest from the files first."""
    manifest = _settled(data_dir)
    if manifest is not None:
        return manifest.coverage()
    from .parquet import BarStore

    return BarStore(data_dir).coverage()
