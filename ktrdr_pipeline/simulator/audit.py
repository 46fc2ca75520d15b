"""The simulator's audit log: one JSON line per request and per answer."""

from __future__ import annotations

import json
import time
from collections import deque
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


class AuditLog:
    """One JSON line per request and per answer, for tests and benchmarks; the last 2000
    events are also kept in memory (``recent``)."""

    def __init__(self, path: Path | None):
        self.path = path
        self._fh = open(path, "a", buffering=1, encoding="utf-8") if path else None  # noqa: SIM115
        self.recent: deque[dict[str, Any]] = deque(maxlen=2000)

    def write(self, **event: Any) -> None:
        event = {"time": datetime.now(UTC).isoformat(timespec="milliseconds"),
                 "mono": round(time.monotonic(), 6), **event}
        self.recent.append(event)
        if self._fh is not None:
            self._fh.write(json.dumps(event, default=str) + "\n")

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
