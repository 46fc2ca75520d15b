"""Talking to Interactive Brokers: limits, pacing, connection, fetch, contracts."""
