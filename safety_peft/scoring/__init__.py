"""Scoring: one engine, small method plug-ins, float32 scores keyed by parameter name."""

from .engine import score_model
from .methods import Method, SnipVariant
from .scores import SafetyScores

__all__ = ["Method", "SafetyScores", "SnipVariant", "score_model"]
