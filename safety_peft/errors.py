"""Exceptions with messages a user can act on.

Each error subclasses ``ValueError`` or ``TypeError`` as well, so callers that already catch the builtin
kinds keep working.
"""


class SafetyPeftError(Exception):
    """Base class of every error this library raises on purpose."""


class CalibrationDataError(SafetyPeftError, ValueError):
    """The calibration (or evaluation) data is empty, malformed or cannot be tokenized."""


class UnsupportedModuleError(SafetyPeftError, TypeError):
    """A targeted module is of a type the scoring engine or the tuner cannot handle."""


class MaskFileError(SafetyPeftError, ValueError):
    """A mask artifact is missing, truncated, corrupt, or of an unknown format version."""


class MaskMismatchError(SafetyPeftError, ValueError):
    """Masks were made for another model (names, shapes or weight fingerprint differ)."""


class SelectionError(SafetyPeftError, ValueError):
    """Bad selection settings: sparsity out of range, unknown group, incompatible scores."""
