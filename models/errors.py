"""Exceptions for user errors. The CLI prints them as one line; the service maps them to HTTP 4xx."""

from __future__ import annotations


class FlowserveError(Exception):
    """Base class: a problem the user can fix (bad file, bad config, bad input)."""


class DataError(FlowserveError):
    """A data file or directory is missing or malformed."""


class ConfigError(FlowserveError):
    """A configuration file is invalid."""


class ArtifactError(FlowserveError):
    """A model artifact is missing, malformed or fails its checksums."""
