"""marketflow: a real-time market-data daemon."""

__version__ = "0.1.0"
