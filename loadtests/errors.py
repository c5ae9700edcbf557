"""The errors a load test raises. Each names the bad value; the CLI turns the input errors into one stderr line."""

from __future__ import annotations


class LoadTestInputError(ValueError):
    """Bad input: an unknown or invalid profile, a bad override, a host that may not be targeted."""


class LoadRunError(RuntimeError):
    """The load generator itself failed (locust crashed or could not start); carries the tail of its log."""
