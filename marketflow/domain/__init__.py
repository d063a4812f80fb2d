"""Pure domain: ticks, per-second windows, minute aggregates and the ports adapters implement."""
