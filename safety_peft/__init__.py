"""safety-peft: find the weights that carry an aligned model's safety, and fine-tune without touching them.

Workflow (after Wei et al. 2024): score (Wanda / SNIP on harmful requests with refusals), select by set
difference against utility, lock with the ``SafetyFreezeConfig`` PEFT method, rescore and compare, share
masks on the Hub, and validate by ablation and refusal evaluation. Importing this package registers the
``SAFETY_FREEZE`` method with PEFT, so ``PeftModel.from_pretrained`` can load its adapters.
"""

__version__ = "0.1.0"

from .ablation import AblationResult, ablate, save_ablated
from .alignment import make_aligned_base
from .callbacks import LockCheckCallback, lock_trainer
from .compare import DriftReport, compare_masks
from .critical import find_safety_critical
from .data import CalibrationData, CalibrationSample, iter_batches, load_calibration_data
from .default_model import DEFAULT_MODEL, default_model_path, load_model_and_tokenizer
from .errors import (
    CalibrationDataError,
    MaskFileError,
    MaskMismatchError,
    SafetyPeftError,
    SelectionError,
    UnsupportedModuleError,
)
from .evaluation import REFUSAL_PHRASES, EvalResult, evaluate_safety, is_refusal
from .hub import HubError, HubNotFoundError
from .masks import Granularity, SafetyMasks
from .rescore import RescoreCallback, rescore
from .scoring import Method, SafetyScores, SnipVariant, score_model
from .selection import SelectionGroup, select_critical, top_mask
from .targets import find_target_modules
from .tuners import SafetyFreezeConfig, SafetyFreezeModel
from .verification import LockReport, LockViolationError, verify_lock

__all__ = [
    "DEFAULT_MODEL",
    "REFUSAL_PHRASES",
    "AblationResult",
    "CalibrationData",
    "CalibrationDataError",
    "CalibrationSample",
    "DriftReport",
    "EvalResult",
    "Granularity",
    "HubError",
    "HubNotFoundError",
    "LockCheckCallback",
    "LockReport",
    "LockViolationError",
    "MaskFileError",
    "MaskMismatchError",
    "Method",
    "RescoreCallback",
    "SafetyFreezeConfig",
    "SafetyFreezeModel",
    "SafetyMasks",
    "SafetyPeftError",
    "SafetyScores",
    "SelectionError",
    "SelectionGroup",
    "SnipVariant",
    "UnsupportedModuleError",
    "ablate",
    "compare_masks",
    "default_model_path",
    "evaluate_safety",
    "find_safety_critical",
    "find_target_modules",
    "is_refusal",
    "iter_batches",
    "load_calibration_data",
    "load_model_and_tokenizer",
    "lock_trainer",
    "make_aligned_base",
    "rescore",
    "save_ablated",
    "score_model",
    "select_critical",
    "top_mask",
    "verify_lock",
]
