"""Exception types of diffprune: every user-facing failure raises one of these."""


class DiffPruneError(Exception):
    """Base class of all errors diffprune raises for bad input or state."""


class ConfigError(DiffPruneError, ValueError):
    """A configuration value is invalid or unknown."""


class DiffFormatError(DiffPruneError):
    """A saved diff is corrupt, truncated, hand-edited or of an unknown format version."""


class BaseMismatchError(DiffPruneError):
    """A diff does not belong to the model it is applied to (names, shapes or fingerprint)."""
