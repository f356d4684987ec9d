"""Trainer callbacks for training with locked safety-critical weights.

``LockCheckCallback`` proves the lock held: it records the locked base values when training starts and
compares them, bit for bit, with the effective weights when training ends (and every N steps if asked).
``lock_trainer(trainer)`` attaches it to a Trainer or TRL trainer in one line.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Literal

from torch import nn
from transformers import TrainerCallback

from .verification import LockReport, LockSnapshot, LockViolationError, snapshot_locked, verify_lock

__all__ = ["LockCheckCallback", "lock_trainer"]

logger = logging.getLogger(__name__)


def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP and friends
        model = model.module
    return model


def _masks_from_model(model: nn.Module):
    """The masks of the active ``safety_freeze`` adapter of a PEFT model."""
    base = getattr(model, "base_model", None)
    if base is None or not hasattr(base, "get_masks"):
        raise ValueError(
            "LockCheckCallback(masks=None) needs a PEFT model with a safety_freeze adapter; pass masks= explicitly."
        )
    return base.get_masks(base.active_adapters[0])


class LockCheckCallback(TrainerCallback):
    """Verify during and after training that no locked entry moved.

    Args:
        masks: the ``SafetyMasks`` to check; ``None`` takes them from the model's active adapter.
        reference: the base model or its state dict; ``None`` snapshots the locked base values when
            training begins (only the locked entries are copied, to CPU).
        every_n_steps: also check after every N optimizer steps (0 or ``None``: only at the end).
        on_violation: ``"raise"`` (default) stops training with ``LockViolationError``; ``"log"`` logs an
            error and carries on.

    The last result is kept in ``self.report``.
    """

    def __init__(
        self,
        masks: Any = None,
        reference: Mapping[str, Any] | nn.Module | None = None,
        *,
        every_n_steps: int | None = None,
        on_violation: Literal["raise", "log"] = "raise",
    ) -> None:
        if on_violation not in ("raise", "log"):
            raise ValueError(f"on_violation must be 'raise' or 'log', got {on_violation!r}")
        self.masks = masks
        self.reference = reference
        self.every_n_steps = every_n_steps or 0
        self.on_violation = on_violation
        self.snapshot: LockSnapshot | None = None
        self.report: LockReport | None = None

    def on_train_begin(self, args, state, control, model: nn.Module | None = None, **kwargs: Any):
        model = _unwrap(model)
        if self.masks is None:
            self.masks = _masks_from_model(model)
        source = self.reference if self.reference is not None else model
        self.snapshot = snapshot_locked(source, self.masks)

    def on_step_end(self, args, state, control, model: nn.Module | None = None, **kwargs: Any):
        if self.every_n_steps and state.global_step % self.every_n_steps == 0:
            self.check(model, f"step {state.global_step}")

    def on_train_end(self, args, state, control, model: nn.Module | None = None, **kwargs: Any):
        self.check(model, "end of training")

    def check(self, model: nn.Module, when: str = "now") -> LockReport:
        """Verify the lock on ``model`` against the snapshot; raise or log if anything moved."""
        if self.snapshot is None:
            raise RuntimeError("LockCheckCallback.check() before on_train_begin: no reference values yet")
        self.report = verify_lock(_unwrap(model), self.masks, self.snapshot)
        if self.report.ok:
            logger.info("safety lock check (%s): %s", when, self.report)
        elif self.on_violation == "raise":
            raise LockViolationError(f"safety lock check ({when}): {self.report}")
        else:
            logger.error("safety lock check (%s): %s", when, self.report)
        return self.report


def lock_trainer(trainer: Any, masks: Any = None, **kwargs: Any) -> LockCheckCallback:
    """Attach a :class:`LockCheckCallback` to ``trainer`` (a transformers or TRL trainer) and return it.

    ``masks`` defaults to the masks of the model's active ``safety_freeze`` adapter; other keyword
    arguments go to ``LockCheckCallback``.
    """
    callback = LockCheckCallback(masks, **kwargs)
    trainer.add_callback(callback)
    return callback
