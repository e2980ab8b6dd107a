"""Benchmarks against any OpenAI-compatible endpoint: instruction following and load."""
