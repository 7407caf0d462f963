"""Benchmark suite: kernel and end-to-end, each configuration in its own process."""
