"""The Dagster layer: a thin shell over the plain-Python core (one module per concern)."""
