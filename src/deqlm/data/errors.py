"""The one error type of deqlm.data: a user-facing problem with the data, printed on one line by the CLIs."""

from __future__ import annotations


class DataError(ValueError):
    """Missing or empty corpus files, an unreachable hub, a mismatched vocabulary or cache, bad sizes."""
