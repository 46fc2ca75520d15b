"""Reading one bar file, with pyarrow's errors named by the file.

Every reader of the store's Parquet files (:mod:`.parquet`, :mod:`.read`) opens them
through :func:`read_bar_file`, so a corrupt, truncated or unreadable file is always the same
``OSError`` saying which file it is, and a missing file is the caller's stated choice:
``None`` (a partition never written, for the store's own reads) or that same error (a file
the manifest listed, for the research reads).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pyarrow as pa

T = TypeVar("T")


def read_bar_file(path: Path, read: Callable[[Path], T], *,
                  missing_ok: bool = False) -> T | None:
    """``read(path)``; None when the file does not exist and ``missing_ok``; any other
    failure (pyarrow's ``ArrowInvalid`` for a file that is not Parquet, an I/O error, or a
    missing file when not ``missing_ok``) becomes ``OSError("cannot read bar file ...")``."""
    try:
        return read(path)
    except FileNotFoundError as exc:
        if missing_ok:
            return None
        raise OSError(f"cannot read bar file {path}: {exc}") from exc
    except (pa.ArrowInvalid, OSError) as exc:
        raise OSError(f"cannot read bar file {path}: {exc}") from exc
