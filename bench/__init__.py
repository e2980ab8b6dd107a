"""Benchmarks against the tools users would pick instead; results go to BENCHMARKS.md (`make bench`)."""
