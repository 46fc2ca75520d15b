"""Portfolio Greeks snapshots from IB (socket or Client Portal) into DuckDB.

Plain Python: :mod:`.config` (settings), :mod:`.bridges` (``SocketBridge``,
``PortalBridge``), :mod:`.model` (``Snapshot``), :mod:`.store` (DuckDB tables and the
outage buffer), :mod:`.watchdog` (reconnects), :mod:`.runner` (the wall-clock poll loop),
:mod:`.cli` (``ktrdr-pipeline greeks``). The Dagster shell is
:mod:`ktrdr_pipeline.defs.greeks`; it also does the schedule's cron arithmetic (with
Dagster's own cron code) and passes plain times down.
"""
