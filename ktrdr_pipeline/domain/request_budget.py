"""How many bars one historical request may return unless configured.

IB accepts up to 365 D of 1-min bars, but the cost of a big request is IB's service time
and the client's timeout, not a rule (``docs/ib-facts.md`` §2): IB's own sample asks for
``10 D`` of 1-min bars, LEAN for up to ``7 D``; a user reports ``5 D`` of 1-min RTH bars
(1,950 bars) answering normally and ``6 D`` (2,340) hitting a 60 s timeout on a busy day
(ib_insync #268). Service time grows with the bars in an answer, so the budget counts
bars. Its own module (no calendar) so that settings can name the default without loading
the planner's calendars.
"""

#: LEAN's 7 D of regular-hours minute bars, 7 × 390 (``KTRDR_MAX_BARS_PER_REQUEST``).
DEFAULT_MAX_BARS_PER_REQUEST = 7 * 390
