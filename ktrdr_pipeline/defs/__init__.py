"""The Dagster layer: a thin shell over the plain-Python core, one package per domain
(``bars/``, ``greeks/``), each with a ``defs()`` returning its
``dg.Definitions``; :mod:`ktrdr_pipeline.definitions` merges them."""
