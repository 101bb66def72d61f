"""Benchmarks: commands run against the embedded SeaweedFS, never part of the test suite."""
