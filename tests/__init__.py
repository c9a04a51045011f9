"""The test suite. A regular package, so that `tests.support` is this checkout's even where some installed
distribution ships a top-level `tests` package of its own."""
