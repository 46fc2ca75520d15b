"""The ``ktrdr-pipeline`` command.

Start-up is kept light: heavy modules (asyncio, pandas, the IB client, Dagster) are
imported inside the commands that need them, so ``sql "select 1"`` loads DuckDB and
little else (``python -X importtime -m ktrdr_pipeline.cli sql "select 1"``).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path

from .settings import Settings, SettingsError, load_env_file, parse_utc_time, validate_port

log = logging.getLogger("ktrdr_pipeline")


class CliError(Exception):
    """A user error: printed without a traceback, exit status 2."""


def _port(text: str) -> int:
    try:
        return validate_port(int(text))
    except (ValueError, SettingsError):
        raise argparse.ArgumentTypeError(
            f"invalid port {text!r}: must be an integer from 1 to 65535") from None


def _port_or_zero(text: str) -> int:
    if text.strip() == "0":
        return 0
    return _port(text)


def _iso_time(text: str) -> datetime:
    try:
        return parse_utc_time(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid time {text!r}: use ISO 8601, e.g. 2025-03-03T15:00:00+00:00") from None


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: must be a number > 0")
    return value


def _add_gateway(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("gateway", help="run the IB Gateway simulator until interrupted",
                       description="Run the IB Gateway simulator (TWS socket protocol, Client "
                                   "Portal Web API, fault injection) until interrupted.")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=_port_or_zero, default=4002,
                   help="TWS API socket port (default 4002; 0 = any free port)")
    p.add_argument("--portal-port", type=_port_or_zero, default=None,
                   help="also serve the Client Portal Web API on this loopback port")
    p.add_argument("--portal-plain-http", action="store_true",
                   help="serve the Client Portal API without TLS (tests only)")
    p.add_argument("--admin-port", type=_port_or_zero, default=0,
                   help="loopback port of the fault-injection admin interface (default: any)")
    p.add_argument("--seed", type=int, default=0, help="market model seed (default 0)")
    p.add_argument("--latency", choices=("realistic", "none"), default="realistic",
                   help="answer delays: 'realistic' models IB, 'none' answers at once")
    p.add_argument("--universe", type=Path, default=None,
                   help="YAML file replacing the default instruments and account")
    p.add_argument("--audit-log", type=Path, default=None,
                   help="write one JSON line per request and per answer to this file")
    p.add_argument("--clock", type=_iso_time, default=None,
                   help="the market's time at start (ISO 8601); then advances in real time")
    p.add_argument("--pacing-time-scale", type=_positive_float, default=1.0,
                   help="shrink IB's pacing windows by this factor (tests and benchmarks only)")
    p.set_defaults(func=cmd_gateway)


async def _run_gateway(args: argparse.Namespace) -> None:
    import asyncio

    from .simulator.server import GatewayServer

    gw = GatewayServer(
        args.host, args.port, seed=args.seed, latency=args.latency, universe=args.universe,
        audit_log=args.audit_log, clock=args.clock, pacing_time_scale=args.pacing_time_scale,
        portal_port=args.portal_port, portal_tls=not args.portal_plain_http,
        admin_port=args.admin_port,
    )
    try:
        await gw.start()
    except OSError as exc:
        raise CliError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from exc
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"listening on {args.host}:{gw.port}", flush=True)
    print(f"admin interface on 127.0.0.1:{gw.admin_port}", flush=True)
    if gw.portal_port is not None:
        scheme = "http" if args.portal_plain_http else "https"
        print(f"client portal on {scheme}://127.0.0.1:{gw.portal_port}/v1/api", flush=True)
        if gw.portal_cert_path:
            print(f"client portal certificate: {gw.portal_cert_path}", flush=True)
    try:
        await stop.wait()
    finally:
        await gw.stop()


def cmd_gateway(args: argparse.Namespace) -> int:
    import asyncio

    try:
        asyncio.run(_run_gateway(args))
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import asyncio

    from .demo import demo_settings, run_demo

    try:
        return asyncio.run(run_demo(demo_settings(), forever=not args.once, ui_port=args.ui_port))
    except RuntimeError as exc:
        raise CliError(str(exc)) from exc


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the main job on the embedded IB Gateway simulator")
    p.add_argument("--once", action="store_true",
                   help="stop when the initial backfill has finished (for tests)")
    p.add_argument("--ui-port", type=_port, default=None,
                   help="port of the Dagster UI (default 3000, or a free one)")
    p.set_defaults(func=cmd_demo)


async def _status(settings: Settings) -> dict:
    from .ib.connection import IBConnection

    conn = IBConnection.from_settings(settings, backoff_s=0.5, connect_timeout=5)
    try:
        await conn.connect()
        status = conn.status()
        status["server_time"] = (await conn.ib.reqCurrentTimeAsync()).isoformat()
        return status
    finally:
        await conn.disconnect()


def cmd_status(args: argparse.Namespace) -> int:
    import asyncio

    from .ib.errors import GatewayUnreachable

    settings = Settings.from_env()
    try:
        status = asyncio.run(_status(settings))
    except GatewayUnreachable as exc:
        print(json.dumps({"connected": False, "host": settings.ib_host,
                          "port": settings.ib_port, "error": str(exc)}, indent=2))
        print(f"ktrdr-pipeline: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(status, indent=2))
    return 0


def _add_status(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="connect to IB Gateway/TWS and print the status as JSON",
                       description="Connect to IB_HOST:IB_PORT and print connection status as "
                                   "JSON; exits 1 when the gateway is unreachable.")
    p.set_defaults(func=cmd_status)


def _date(text: str):
    from datetime import date

    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid date {text!r}: use YYYY-MM-DD") from None


class _Progress:
    """A one-line progress bar on stderr for long loads (``forced``: ``KTRDR_PROGRESS``,
    even when stderr is no terminal)."""

    def __init__(self, enabled: bool, forced: bool = False):
        self.enabled = enabled and sys.stderr.isatty() or forced

    def __call__(self, period: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        width = 30
        filled = int(width * done / max(total, 1))
        sys.stderr.write(f"\r{period:>10} [{'#' * filled}{'.' * (width - filled)}] "
                         f"{done}/{total}")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


async def _with_context(fn, settings: Settings):
    from .loader import PipelineContext

    ctx = PipelineContext.from_settings(settings)
    try:
        return await fn(ctx)
    finally:
        await ctx.close()


def _run_data_command(coro_fn) -> object:
    """Run an async data command, turning user errors into clear CLI errors."""
    import asyncio

    from .domain.symbols import SymbolError
    from .ib.errors import IBError
    from .loader import LoadError
    from .store.catalog import CatalogLockedError, QueryError
    from .store.schema import BarValidationError

    try:
        return asyncio.run(_with_context(coro_fn, Settings.from_env()))
    except (IBError, SymbolError, LoadError, QueryError, CatalogLockedError,
            BarValidationError, ValueError) as exc:
        raise CliError(str(exc)) from exc


def cmd_load(args: argparse.Namespace) -> int:
    from . import commands
    from .domain.symbols import SymbolError, parse_symbol

    settings = Settings.from_env()
    # bad input is refused before anything is created or any connection opened
    try:
        parse_symbol(args.symbol)
    except SymbolError as exc:
        raise CliError(str(exc)) from None
    if args.start and args.end and args.start > args.end:
        raise CliError(f"--start {args.start} is after --end {args.end}")
    progress = _Progress(not args.json, settings.progress_bar)
    loaded: list = []
    try:
        summary = _run_data_command(lambda ctx: commands.load(
            ctx, args.symbol, args.timeframe, args.mode, args.start, args.end, progress,
            on_partition=loaded.append))
    finally:  # what was written before a failure is reported too
        progress.close()
        _report(settings, "the loaded partitions", lambda: _bar_materializations(loaded))
    data = commands.summary_dict(summary)
    if args.json:
        print(json.dumps(data))
    else:
        print(f"{data['symbol']} {data['timeframe']} {data['mode']} {data['start']}..{data['end']}: "
              f"{data['status']}; {data['cached_before']} bars stored before, "
              f"{data['gaps_analyzed']} gap(s), {data['ib_requests_made']} IB request(s), "
              f"{data['fetched_bars']} bars fetched, {data['bars_written']} bars written")
    if data["reason"]:  # nothing of the range could be loaded
        print(f"ktrdr-pipeline: nothing loaded: {data['reason']}", file=sys.stderr)
        return 1
    return 0


def _bar_materializations(results: list) -> list:
    from .defs.bars.report import load_materializations

    return load_materializations(results)


def _report(settings: Settings, what: str, events: Callable[[], list]) -> None:
    """Tell the Dagster instance (when there is one) about work done here; the
    data is stored either way, so a failure to report is a warning, not an error."""
    if not settings.has_dagster_instance():
        return
    from .defs.instance import report_materializations

    try:
        report_materializations(settings, events())
    except Exception as exc:  # noqa: BLE001 - the data is written; only the UI lags
        log.warning("%s are stored but could not be reported to the Dagster instance at "
                    "%s: %s", what, settings.dagster_instance_home, exc)


def _report_greeks(config, stats, snap) -> None:
    from .defs.greeks.assets import greeks_materialization

    _report(config.settings, "the Greeks snapshots",
            lambda: [greeks_materialization(config, stats, snap)] if stats.ticks else [])


def cmd_ranges(args: argparse.Namespace) -> int:
    from . import commands

    data = _run_data_command(lambda ctx: commands.ranges(ctx, args.symbol))
    print(json.dumps(data, indent=2))
    return 0


def cmd_sql(args: argparse.Namespace) -> int:
    from .store.catalog import CatalogLockedError, QueryError, write_query

    settings = Settings.from_env()
    if args.format == "parquet" and args.output is None:
        raise CliError("--format parquet writes a file: add --output FILE")
    if args.output is not None and args.output.is_dir():
        raise CliError(f"--output {args.output} is a directory; name a file")
    try:
        if args.format == "parquet":
            write_query(settings.data_dir, args.query, "parquet", args.output,
                        settings.timeframes)
        elif args.output is not None:
            with args.output.open("w", encoding="utf-8", newline="") as out:
                write_query(settings.data_dir, args.query, args.format, out,
                            settings.timeframes)
        else:
            write_query(settings.data_dir, args.query, args.format, sys.stdout,
                        settings.timeframes)
    except (QueryError, CatalogLockedError, ValueError, OSError) as exc:
        raise CliError(str(exc)) from exc
    return 0


def cmd_coverage(args: argparse.Namespace) -> int:
    from .store.catalog import COVERAGE_COLUMNS, format_result
    from .store.contents import read_coverage
    from .store.manifest import ManifestEntry

    at = ManifestEntry.as_datetime
    rows = [(r.symbol, r.timeframe, at(r.first_bar), at(r.last_bar), r.rows, r.partitions)
            for r in read_coverage(Settings.from_env().data_dir)]
    print(format_result(rows, [c for c, _ in COVERAGE_COLUMNS], args.format), end="")
    return 0


def cmd_manifest(args: argparse.Namespace) -> int:
    from .store.parquet import BarStore

    store = BarStore(Settings.from_env().data_dir)
    if args.action == "rebuild":
        count = store.rebuild_manifest()
        print(json.dumps({"manifest": str(store.manifest), "partitions": count}))
        return 0
    problems = store.check_manifest()
    for line in problems:
        print(line)
    if problems:
        print(f"{len(problems)} disagreement(s) between {store.manifest} and the Parquet "
              "files; `ktrdr-pipeline manifest rebuild` makes it agree", file=sys.stderr)
        return 1
    print(f"{store.manifest} agrees with the Parquet files")
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from .store.parquet import BarStore

    folded = BarStore(Settings.from_env().data_dir).migrate_daily_files()
    print(json.dumps({"daily_files_folded": folded}))
    return 0


def cmd_symbols(args: argparse.Namespace) -> int:
    from . import commands

    settings = Settings.from_env()
    if args.action == "list":
        for key in commands.symbol_partitions(settings):
            print(key)
        return 0
    if not args.symbols:
        raise CliError(f"symbols {args.action} needs at least one symbol")
    if args.action == "remove":
        from .domain.symbols import SymbolError

        try:
            removed = commands.remove_symbols(settings, args.symbols)
        except (SymbolError, ValueError, OSError) as exc:
            raise CliError(str(exc)) from exc
        print(json.dumps({"removed": removed}))
        return 0
    from .domain.symbols import SymbolError, parse_symbol

    refused: dict[str, dict] = {}
    for text in args.symbols:  # malformed symbols are refused before anything is created
        try:
            parse_symbol(text)
        except SymbolError as exc:
            refused[text] = {"ok": False, "error": str(exc)}
    wanted = [s for s in args.symbols if s not in refused]
    outcomes = _run_data_command(
        lambda ctx: commands.add_symbols(ctx, wanted)) if wanted else {}
    outcomes = {s: refused.get(s) or outcomes[s] for s in args.symbols}
    print(json.dumps({s: ({"added": o["contract"]["key"]} if o["ok"] else {"error": o["error"]})
                      for s, o in outcomes.items()}, indent=2))
    return 0 if all(o["ok"] for o in outcomes.values()) else 1


def _timeframe(text: str) -> str:
    """``--timeframe``: the canonical name (``1H`` -> ``1h``), or a usage error saying what
    is allowed."""
    from .domain.timeframes import get_timeframe

    try:
        return get_timeframe(text).name
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_data_commands(sub: argparse._SubParsersAction) -> None:
    from .domain.timeframes import TIMEFRAMES

    p = sub.add_parser("load", help="load bars for a symbol and timeframe (same code as the "
                                    "assets)")
    p.add_argument("symbol")
    p.add_argument("--timeframe", required=True, type=_timeframe, metavar="TF",
                   help=f"one of {', '.join(TIMEFRAMES)} (1H = 1h; 1M is refused: 1m or 1mo)")
    p.add_argument("--mode", choices=("tail", "backfill", "full"), default="tail")
    p.add_argument("--start", type=_date, help="first session date (YYYY-MM-DD, inclusive)")
    p.add_argument("--end", type=_date, help="last session date (YYYY-MM-DD, inclusive)")
    p.add_argument("--json", action="store_true", help="print one JSON summary object")
    p.set_defaults(func=cmd_load)

    p = sub.add_parser("ranges", help="IB's earliest data and what is stored, per timeframe")
    p.add_argument("symbol")
    p.set_defaults(func=cmd_ranges)

    p = sub.add_parser(
        "sql", help="run a read-only DuckDB query against the catalog",
        description="Run one read-only statement. Views: bars (all timeframes), bars_<tf>, "
                    "coverage; table macros symbol_bars('<tf>', '<SYMBOL>') (one symbol's "
                    "bars) and latest_bars('<tf>', n) (the last n bars of every symbol, "
                    "reading only recent periods). Only the views the statement names are "
                    "built, over the partitions its symbol/period filters allow.")
    p.add_argument("query", help="e.g. \"SELECT * FROM coverage\"")
    p.add_argument("--format", choices=("table", "csv", "json", "parquet"), default="table",
                   help="table (aligned, for a terminal), csv, json (both streamed), parquet "
                        "(streamed into --output)")
    p.add_argument("--output", type=Path, default=None, metavar="FILE",
                   help="write the result to FILE instead of stdout (required for parquet)")
    p.set_defaults(func=cmd_sql)

    p = sub.add_parser("coverage", help="what is stored per symbol and timeframe (first and "
                                        "last bar, rows, partitions), from the manifest")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    p.set_defaults(func=cmd_coverage)

    p = sub.add_parser(
        "manifest", help="the partition manifest: rebuild it from the Parquet files, or "
                         "check that it agrees with them",
        description="The manifest (KTRDR_DATA_DIR/manifest.sqlite) lists every stored "
                    "partition with its rows, first and last bar and file size, so coverage, "
                    "ranges and the tail-fill sensor need not open the Parquet files. Every "
                    "write keeps it current and readers repair it after a killed writer; "
                    "rebuild re-reads every file's footer (after files were copied, restored "
                    "or deleted by hand, or when the manifest was lost: readers rebuild a "
                    "missing one by themselves); check lists each disagreement and exits 1 "
                    "if there is any.")
    p.add_argument("action", choices=("rebuild", "check"))
    p.set_defaults(func=cmd_manifest)

    p = sub.add_parser(
        "migrate", help="bring the store's layout up to date: fold the daily files of "
                        "seconds bars into monthly files",
        description="Seconds bars (1s..30s) are stored one file per symbol and month, one "
                    "row group per day; stores written before kept a file per day, which "
                    "readers now ignore. This folds them into their months (merged with what "
                    "the month holds), then removes them. Safe to interrupt and to repeat.")
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser(
        "symbols", help="manage the symbol universe: the universe file and the 'symbols' "
                        "partitions",
        description="add: validate each symbol through IB, then add it to the universe file "
                    "(KTRDR_UNIVERSE or KTRDR_DATA_DIR/universe.yaml) and the 'symbols' "
                    "partitions; remove: take it out of both (stored bars stay); list: the "
                    "'symbols' partitions.")
    p.add_argument("action", choices=("add", "remove", "list"))
    p.add_argument("symbols", nargs="*")
    p.set_defaults(func=cmd_symbols)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ktrdr-pipeline",
        description="Interactive Brokers historical bars as validated, partitioned Parquet.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_gateway(sub)
    _add_demo(sub)
    _add_status(sub)
    _add_data_commands(sub)
    from .greeks.cli import add_greeks_parser

    add_greeks_parser(sub, report=_report_greeks)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not args.verbose:
        logging.getLogger("ib_async").setLevel(logging.CRITICAL)  # ours say it better
        # the Dagster instance's storage migrations (symbols, the demo): routine, not news
        logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        load_env_file()
        Settings.from_env()
        return args.func(args)
    except (CliError, SettingsError) as exc:
        print(f"ktrdr-pipeline: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
