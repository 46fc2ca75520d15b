"""``ktrdr-pipeline greeks run [--once]``: the Greeks bridge outside Dagster.

Wire into ``ktrdr_pipeline/cli.py`` with ``add_greeks_parser(sub)``.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
from collections.abc import Callable
from typing import Any

from ..settings import SettingsError

log = logging.getLogger(__name__)


#: Called with (config, stats, last snapshot) when a run ends (the CLI reports the run to
#: the Dagster instance with it; this package does not know Dagster).
RunReport = Callable[[Any, Any, Any], None]


def add_greeks_parser(sub: argparse._SubParsersAction,
                      report: RunReport | None = None) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "greeks", help="portfolio Greeks snapshots into KTRDR_DATA_DIR/greeks.duckdb",
        description="Record the portfolio's option Greeks (IB_API_MODE=SOCKET or PORTAL) "
                    "every BRIDGE_POLL_INTERVAL seconds into the DuckDB tables "
                    "portfolio_greeks and api_logs.")
    actions = p.add_subparsers(dest="greeks_command", required=True, metavar="ACTION")
    run = actions.add_parser(
        "run", help="take snapshots until interrupted (or one with --once)",
        description="Take a snapshot at every BRIDGE_POLL_INTERVAL tick of the wall clock "
                    "until interrupted (Ctrl-C, SIGTERM), reconnecting after disconnects "
                    "and IB's nightly reset; with --once take one snapshot now, print it "
                    "as JSON and exit.")
    run.add_argument("--once", action="store_true",
                     help="take one snapshot now, print it as JSON and exit")
    run.set_defaults(func=cmd_greeks, report=report)
    return p


def _json_rows(rows: list[dict[str, Any]]) -> str:
    def value(v: Any) -> Any:
        return v.isoformat() if hasattr(v, "isoformat") else v

    return json.dumps([{k: value(v) for k, v in r.items()} for r in rows], indent=2)


async def _run(args: argparse.Namespace) -> int:
    import asyncio

    from .config import GreeksConfig
    from .runner import run_snapshots

    config = GreeksConfig.from_env()  # a bad IB_API_MODE (or other value) stops us here
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # pragma: no cover - not main thread
            pass
    stats, snap = await run_snapshots(config, once=args.once, stop=stop)
    report = getattr(args, "report", None)
    if report is not None:
        report(config, stats, snap)
    if args.once and snap is not None:
        print(_json_rows(snap.rows()))
    return 0


def cmd_greeks(args: argparse.Namespace) -> int:
    """``ktrdr-pipeline greeks run [--once]``; exit 0, or 1 when no snapshot was taken
    with ``--once``. Setting errors raise :class:`SettingsError` (the CLI prints them)."""
    import asyncio  # lazily: the ktrdr-pipeline command starts without it

    from .bridges import BridgeUnavailable

    if getattr(args, "greeks_command", "run") != "run":  # pragma: no cover - argparse
        raise SettingsError(f"unknown greeks action {args.greeks_command!r}")
    try:
        return asyncio.run(_run(args))
    except BridgeUnavailable as exc:
        log.error("%s", exc)
        return 1
