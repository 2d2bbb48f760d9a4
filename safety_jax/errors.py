"""The library's error types: every one is a ``ValueError``, and each message names the field or path and the fix."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is missing, inconsistent or unsupported."""


class DataError(ValueError):
    """A dataset does not match its DataConfig (missing or mistyped column, too few rows, ...)."""


class CheckpointError(ValueError):
    """A checkpoint or model folder does not match its config, the Llama architecture or the requested target."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint's leaves or shapes do not match what the caller asked to restore."""


class NonFiniteError(ValueError):
    """Training produced a non-finite loss or gradient."""


__all__ = ["CheckpointError", "CheckpointMismatchError", "ConfigError", "DataError", "NonFiniteError"]
