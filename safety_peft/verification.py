"""``verify_lock``: did any locked entry move? Compared bit for bit, not within a tolerance.

The weights checked are the ones the model computes with: for a PEFT model with ``safety_freeze`` layers,
the effective ``where(M, W, W + Δ)`` (computed on the side, the model is not merged or changed); for a
plain (merged) model, its parameters.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Union

import torch
from torch import nn

from safety_peft.errors import MaskMismatchError, SafetyPeftError

__all__ = ["LockReport", "LockSnapshot", "LockViolationError", "current_weights", "snapshot_locked", "verify_lock"]

_BIT_VIEWS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class LockViolationError(SafetyPeftError, RuntimeError):
    """A locked entry no longer holds its base value."""


@dataclass
class LockReport:
    """How many locked entries changed (bitwise) and by how much at most; both must be 0."""

    num_locked: int
    num_changed: int
    max_abs_change: float
    changed: dict[str, int] = field(default_factory=dict)  # weight name -> changed locked entries

    @property
    def ok(self) -> bool:
        return self.num_changed == 0

    def __str__(self) -> str:
        if self.ok:
            return f"lock holds: all {self.num_locked:,} locked entries keep their base bits"
        worst = sorted(self.changed.items(), key=lambda kv: -kv[1])[:3]
        where = ", ".join(f"{name} ({n:,})" for name, n in worst)
        return (
            f"LOCK BROKEN: {self.num_changed:,} of {self.num_locked:,} locked entries changed (largest change "
            f"{self.max_abs_change:.3g}); most in {where}"
        )


class LockSnapshot(dict):
    """Only the locked entries of the base weights, by weight name: a compact reference for ``verify_lock``."""


Reference = Union[Mapping[str, torch.Tensor], nn.Module, LockSnapshot]


def _strip(name: str) -> str:
    return name.replace(".base_layer.", ".")


def _find(names: Mapping[str, Any], wanted: str) -> str | None:
    """The key of ``names`` that is ``wanted`` or ends with ``"." + wanted`` once PEFT wrappers are removed."""
    if wanted in names:
        return wanted
    matches = [n for n in names if _strip(n) == wanted or _strip(n).endswith("." + wanted)]
    return matches[0] if len(matches) == 1 else None


def current_weights(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """The weights ``model`` computes with, by plain weight name, without changing the model.

    ``safety_freeze`` layers give their effective weight (base weight if disabled or merged); other
    modules give their parameter.
    """
    from safety_peft.tuners.safety_freeze.layer import SafetyFreezeLayer

    layers = {
        _strip(f"{n}.weight"): m for n, m in model.named_modules() if isinstance(m, SafetyFreezeLayer)
    }
    params = dict(model.named_parameters(remove_duplicate=False))
    out = {}
    for name in names:
        key = _find(layers, name)
        if key is not None:
            out[name] = layers[key].current_weight()
            continue
        key = _find(params, name)
        if key is None:
            raise MaskMismatchError(f"the model has no weight named {name!r}")
        out[name] = params[key].detach()
    return out


def _locked_values(weight: torch.Tensor, masks: Any, name: str) -> torch.Tensor:
    if masks.granularity == "neuron":
        return weight[masks.row_mask(name).to(weight.device)]
    return weight[masks.mask(name).to(weight.device)]


def snapshot_locked(reference: Mapping[str, torch.Tensor] | nn.Module, masks: Any) -> LockSnapshot:
    """Copy the locked entries of ``reference``'s target weights (to CPU): what ``verify_lock`` compares with.

    For a model with ``safety_freeze`` layers the base weights are read (not the effective ones), so a
    snapshot taken mid-training still records the base bits.
    """
    if isinstance(reference, nn.Module):
        from safety_peft.tuners.safety_freeze.layer import SafetyFreezeLayer

        layers = {
            _strip(f"{n}.weight"): m for n, m in reference.named_modules() if isinstance(m, SafetyFreezeLayer)
        }
        weights = {}
        for name in masks.names:
            key = _find(layers, name)
            if key is not None:
                layer = layers[key]
                weights[name] = layer._weight_before_merge if layer.merged else layer.get_base_layer().weight
        missing = [n for n in masks.names if n not in weights]
        weights.update(current_weights(reference, missing) if missing else {})
    else:
        weights = {}
        for name in masks.names:
            key = _find(reference, name)
            if key is None:
                raise MaskMismatchError(f"the reference has no weight named {name!r}")
            weights[name] = reference[key]
    snap = LockSnapshot()
    for name in masks.names:
        with torch.no_grad():
            snap[name] = _locked_values(weights[name].detach(), masks, name).cpu().clone()
    return snap


def verify_lock(model: nn.Module, masks: Any, reference: Reference) -> LockReport:
    """Compare every locked entry of ``model``'s weights with ``reference``, bit for bit.

    ``model`` is a PEFT model (its effective weights are used, nothing is merged) or a plain model;
    ``reference`` is the base model, its state dict, or a :func:`snapshot_locked`. Returns a
    :class:`LockReport`; ``report.ok`` is True only if no locked entry changed at all (a -0.0 that became
    +0.0 counts as a change, and a NaN that stayed the same NaN does not).
    """
    snap = reference if isinstance(reference, LockSnapshot) else snapshot_locked(reference, masks)
    weights = current_weights(model, masks.names)
    num_locked = num_changed = 0
    max_change = 0.0
    changed: dict[str, int] = {}
    for name in masks.names:
        if name not in snap:
            raise MaskMismatchError(f"the reference has no locked values for {name!r}")
        ref = snap[name]
        with torch.no_grad():
            now = _locked_values(weights[name], masks, name).cpu()
        if now.shape != ref.shape:
            raise MaskMismatchError(f"{name!r}: {tuple(now.shape)} locked values in the model, {tuple(ref.shape)} in the reference")
        if now.dtype != ref.dtype:
            raise MaskMismatchError(
                f"{name!r} is {now.dtype} in the model but {ref.dtype} in the reference; compare weights of the "
                "same dtype (bits are compared, not values)"
            )
        view = _BIT_VIEWS[now.element_size()]
        diff = now.contiguous().view(view) != ref.contiguous().view(view)
        n = int(diff.sum())
        num_locked += ref.numel()
        if n:
            num_changed += n
            changed[name] = n
            delta = (now[diff].double() - ref[diff].double()).abs()
            delta = torch.nan_to_num(delta, nan=float("inf"))  # a value that became (or stopped being) NaN
            max_change = max(max_change, float(delta.max()))
    return LockReport(num_locked=num_locked, num_changed=num_changed, max_abs_change=max_change, changed=changed)
