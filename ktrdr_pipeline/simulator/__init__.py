"""The IB Gateway simulator: TWS socket protocol, Client Portal Web API, market model.

Start it in-process with :class:`ktrdr_pipeline.simulator.server.GatewayServer` or from the
command line with ``ktrdr-pipeline gateway``.
"""
