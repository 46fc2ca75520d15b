"""Where a pacing violation in ``bench_ib`` (b) comes from: the client or the gateway.

Runs one repetition of ``bench_ib`` part (b) (18 contracts of 5-sec bars through one
governor, the simulator in a child process) with four timestamps per request, all on the
machine's monotonic clock (``time.monotonic`` is CLOCK_MONOTONIC, shared by processes):

- **grant**: the pacing ledger's time of the reservation (the ledger runs on
  ``time.monotonic`` here instead of ``time.time``; it keeps its events for the analysis);
- **send**: ``Client.reqHistoricalData`` called by the fetcher;
- **write**: the message handed to the socket (``Connection.sendMsg``, after ib_async's
  45 msg/s throttle);
- **receipt**: the simulator's audit-log ``mono`` of the request, the time its pacing
  rules are applied.

It prints the lags between them and, for each request the simulator rejected as a pacing
violation, the accepted request 60 places before it (the one whose window it fell in).
A diagnostic, not a benchmark: no target, nothing written to ``results/``.

    PYTHONPATH=. .venv/bin/python -m benchmarks.probe_pacing_lag [--scale 0.01] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ib_async.client import Client
from ib_async.connection import Connection

from benchmarks import bench_ib
from ktrdr_pipeline.domain.ib_rules import PacingLimits
from ktrdr_pipeline.ib import governor as governor_module
from ktrdr_pipeline.ib.ledger import PacingLedger, SqlitePacingLedger

HIST_MSG_ID = "20"  # reqHistoricalData's outgoing message id in the TWS protocol


class Probe:
    """Instruments the governor, ib_async's client and its connection (process-wide)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.grants: list[tuple[float, str]] = []  # (ledger time, request identity)
        self.sends: list[tuple[float, int, str, str]] = []  # (time, reqId, end, conId)
        self.writes: dict[int, float] = {}  # reqId -> time written to the socket

    def install(self) -> None:
        probe = self

        def make_ledger(kind: str, workdir: Path, name: str) -> PacingLedger:
            return SqlitePacingLedger(
                probe.workdir / f"{name}.sqlite", clock=time.monotonic, retention=3600
            )

        acquire = governor_module.PacingGovernor._acquire  # noqa: SLF001

        async def _acquire(self, request, large):  # noqa: ANN001, ANN202
            res = await acquire(self, request, large)
            if request is not None:
                probe.grants.append((res.at, request.identity))
            return res

        req_hist = Client.reqHistoricalData

        def reqHistoricalData(self, reqId, contract, end, *args, **kwargs):  # noqa: ANN001, ANN202, N802, N803
            probe.sends.append((time.monotonic(), reqId, end, str(contract.conId)))
            return req_hist(self, reqId, contract, end, *args, **kwargs)

        send_msg = Connection.sendMsg

        def sendMsg(self, msg: bytes) -> None:  # noqa: N802
            fields = msg[4:].decode(errors="replace").split("\0")
            if len(fields) > 1 and fields[0] == HIST_MSG_ID:
                probe.writes[int(fields[1])] = time.monotonic()
            return send_msg(self, msg)

        bench_ib.make_ledger = make_ledger
        governor_module.PacingGovernor._acquire = _acquire  # noqa: SLF001
        Client.reqHistoricalData = reqHistoricalData
        Connection.sendMsg = sendMsg

    def rows(self, audit: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """One row per 5-sec request the simulator received, in order of receipt."""
        rejected = {
            e.get("req_id")
            for e in audit
            if e.get("message") == "error" and e.get("code") == 162
            and "pacing" in str(e.get("text", "")).lower()
        }
        sends = {rid: (t, end, conid) for t, rid, end, conid in self.sends}
        out = []
        for e in audit:
            if e.get("message") != "reqHistoricalData" or e.get("bar_size") != bench_ib.B_BAR:
                continue
            rid = e["req_id"]
            sent, end, conid = sends[rid]
            # its grant: the latest one for this request before it was sent
            grant = max(
                at for at, ident in self.grants
                if f"|{conid}|" in ident and f"|{end}|" in ident and at <= sent
            )
            out.append({"rid": rid, "grant": grant, "send": sent, "write": self.writes[rid],
                        "receipt": e["mono"], "rejected": rid in rejected})
        return sorted(out, key=lambda r: r["receipt"])


def _ms(values: list[float]) -> str:
    values = sorted(values)
    p95 = values[min(len(values) - 1, int(0.95 * len(values)))]
    return (f"median {statistics.median(values) * 1e3:7.1f} ms, p95 {p95 * 1e3:7.1f} ms, "
            f"max {values[-1] * 1e3:7.1f} ms")


def report(probe: Probe, rows: list[dict[str, Any]], scale: float) -> list[str]:
    lim = PacingLimits(time_scale=scale)
    n = lim.global_max
    lines = [
        f"{len(rows)} requests received, {sum(r['rejected'] for r in rows)} rejected (pacing); "
        f"{len(probe.grants)} grants, {len(probe.sends)} sends, {len(probe.writes)} writes",
        f"grant -> send     {_ms([r['send'] - r['grant'] for r in rows])}",
        f"send -> write     {_ms([r['write'] - r['send'] for r in rows])}",
        f"write -> receipt  {_ms([r['receipt'] - r['write'] for r in rows])}",
        f"grant -> receipt  {_ms([r['receipt'] - r['grant'] for r in rows])}",
    ]
    accepted = [r for r in rows if not r["rejected"]]
    for label, field in (("grants", "grant"), ("receipts", "receipt")):
        t = sorted(r[field] for r in accepted)
        if len(t) > n:
            span = min(t[i + n] - t[i] for i in range(len(t) - n))
            lines.append(f"shortest span of {n + 1} consecutive accepted {label}: {span:.4f} s "
                         f"(the rule needs >= {lim.global_window:g} s)")
    for r in rows:
        if not r["rejected"]:
            continue
        before = [a for a in accepted if a["receipt"] < r["receipt"]]
        if len(before) < n:
            continue
        k = before[-n]
        lines.append(
            f"rejected req {r['rid']}: grant->receipt {1e3 * (r['receipt'] - r['grant']):.1f} ms;"
            f" req {k['rid']} {n} before it: grant->receipt "
            f"{1e3 * (k['receipt'] - k['grant']):.1f} ms (write->receipt "
            f"{1e3 * (k['receipt'] - k['write']):.1f} ms); gap between them at the grants "
            f"{r['grant'] - k['grant']:.4f} s, at the receipts {r['receipt'] - k['receipt']:.4f} s"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", type=float, default=0.01, help="pacing time scale (0.01)")
    p.add_argument("--windows", type=int, default=3, help="60 x WINDOWS requests (3)")
    p.add_argument("--keep", type=Path, help="keep the audit log and ledger in this directory")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="probe-pacing-") as tmp:
        workdir = args.keep or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        probe = Probe(workdir)
        probe.install()
        result = bench_ib.bench_b_rep(0, args.scale, args.windows, "sqlite", workdir)
        audit = bench_ib.read_audit(workdir / "b-audit-0.jsonl")
        lines = report(probe, probe.rows(audit), args.scale)
    print(json.dumps({k: result.get(k) for k in (
        "audit_requests", "audit_pacing_events", "busiest_window_count", "wall_s")}))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
