"""ktrdr-pipeline: Interactive Brokers historical bars as validated, partitioned Parquet."""

__version__ = "0.1.0"
