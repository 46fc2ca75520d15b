"""The Dagster layer: a thin shell over the plain-Python core, one package per domain
(``bars/``; the Greeks in ``greeks.py``), each with a ``defs()`` returning its
``dg.Definitions``; :mod:`ktrdr_pipeline.definitions` merges them."""
