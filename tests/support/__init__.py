"""Test doubles and helpers shared by the test suite and the benchmarks: a fake vLLM server (in process or as a
subprocess a test can SIGKILL), a router harness on loopback, deterministic scorers, artifacts with known
decisions, `tiergate serve` and `tiergate operator` as subprocesses, and waiting on conditions instead of sleeping.

They live here, outside the three product packages, so that neither the wheel nor an image carries them; the
product never imports `tests`. Imported as `tests.support.…`: pytest puts the checkout's root on sys.path
(`pythonpath` in pyproject.toml), and the subprocesses started from here run with the root as their directory.
"""
