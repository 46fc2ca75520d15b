"""The pure core: timeframes, trading sessions, the bar grid, gaps, request planning and
IB's rules. Nothing here does I/O or imports ib_async, dagster, duckdb or the simulator;
every edge (``ib/``, ``store/``, ``greeks/``, the simulator, ``defs/``) builds on it."""
