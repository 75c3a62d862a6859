"""Exception types: one per failure kind, each message a user can act on.

The CLI catches :class:`SplitShieldError` and prints its message on one line.
"""

from __future__ import annotations


class SplitShieldError(Exception):
    """Base class of every error splitshield raises on purpose."""


class ConfigError(SplitShieldError, ValueError):
    """A parameter or spec field has a value that is not allowed."""


class DataError(SplitShieldError):
    """A dataset is missing, malformed, or its images have the wrong shape."""


class SplitError(SplitShieldError, ValueError):
    """A model cannot be cut at the requested point."""


class ThreatModelError(SplitShieldError, PermissionError):
    """An attack asked for something its threat model does not give it."""


class CheckpointError(SplitShieldError):
    """A checkpoint file or its JSON sidecar is missing or inconsistent."""


class CodecError(SplitShieldError, ValueError):
    """A feature frame is malformed, truncated, or exceeds a limit."""
