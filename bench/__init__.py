"""Benchmark scripts: each compares our recipe with the original one in the same run (see docs/benchmarks.md)."""
