"""IB's nightly reset window: no new request starts inside it.

The one parser of ``KTRDR_RESET_WINDOW`` and the one default, used by the settings (to
validate), the IB connection (to wait) and the Greeks watchdog (to time reconnects).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

#: IB Gateway restarts every night around midnight US/Eastern.
DEFAULT_RESET_WINDOW = "23:40-00:05"
RESET_WINDOW_TZ = "US/Eastern"
_OFF = ("", "off", "none")


def _parse_times(text: str) -> tuple[time, time]:
    """``'HH:MM-HH:MM'`` as two times; ``ValueError`` naming the accepted forms else."""
    try:
        a, b = text.split("-")
        return time.fromisoformat(a.strip()), time.fromisoformat(b.strip())
    except ValueError:
        raise ValueError(f"invalid reset window {text!r}: use HH:MM-HH:MM (US/Eastern) "
                         "or 'off'") from None


_DEFAULT_START, _DEFAULT_END = _parse_times(DEFAULT_RESET_WINDOW)


@dataclass(frozen=True)
class ResetWindow:
    """IB's nightly reset (default :data:`DEFAULT_RESET_WINDOW`, US/Eastern); a window whose
    start equals its end is off."""

    start: time = _DEFAULT_START
    end: time = _DEFAULT_END
    tz: str = RESET_WINDOW_TZ

    @classmethod
    def parse(cls, text: str) -> ResetWindow:
        """``'23:40-00:05'`` (US/Eastern), or ``''``/``'off'`` for no window."""
        text = text.strip()
        if text.lower() in _OFF:
            return cls(time(0, 0), time(0, 0))
        return cls(*_parse_times(text))

    def contains(self, t: datetime) -> bool:
        if self.start == self.end:
            return False
        local = t.astimezone(ZoneInfo(self.tz)).time()
        if self.start < self.end:
            return self.start <= local < self.end
        return local >= self.start or local < self.end

    def ends_after(self, t: datetime) -> datetime:
        """When the window that contains ``t`` closes (``t`` itself when outside it)."""
        if not self.contains(t):
            return t
        tz = ZoneInfo(self.tz)
        local = t.astimezone(tz)
        end = datetime.combine(local.date(), self.end, tz)
        if end <= local:
            end = datetime.combine(local.date() + timedelta(days=1), self.end, tz)
        return end.astimezone(UTC)
