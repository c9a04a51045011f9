"""Test helpers that speak real protocols: a fake vLLM OpenAI server and deterministic scorers.

Used by the test suite and the benchmark; nothing in the router's serving path imports this package.
"""
