"""safety-peft: find the weights that carry an aligned model's safety, and fine-tune without touching them.

Workflow (after Wei et al. 2024): score (Wanda / SNIP on harmful requests with refusals), select by set
difference against utility, lock with the ``SafetyFreezeConfig`` PEFT method, rescore and compare.
"""

__version__ = "0.1.0"

from .critical import find_safety_critical
from .data import CalibrationData, CalibrationSample, iter_batches, load_calibration_data
from .errors import (
    CalibrationDataError,
    MaskFileError,
    MaskMismatchError,
    SafetyPeftError,
    SelectionError,
    UnsupportedModuleError,
)
from .masks import SafetyMasks
from .scoring import Method, SafetyScores, SnipVariant, score_model
from .selection import select_critical, top_mask
from .targets import find_target_modules

__all__ = [
    "CalibrationData",
    "CalibrationDataError",
    "CalibrationSample",
    "MaskFileError",
    "MaskMismatchError",
    "Method",
    "SafetyMasks",
    "SafetyPeftError",
    "SafetyScores",
    "SelectionError",
    "SnipVariant",
    "UnsupportedModuleError",
    "find_safety_critical",
    "find_target_modules",
    "iter_batches",
    "load_calibration_data",
    "score_model",
    "select_critical",
    "top_mask",
]
