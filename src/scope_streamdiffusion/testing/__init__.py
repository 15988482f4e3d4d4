"""Random-weight model builders for tests and benchmarks (no downloads)."""
