"""Ablation: zero the critical entries and see whether safety goes with them.

This is the paper's test that a mask really carries safety: if zeroing the locked entries lowers the
refusal rate much more than zeroing the same number of *random* entries in the same matrices, the
selection found weights that matter for refusing. The random control keeps everything else equal: the same
matrices, the same count per matrix (for neuron masks: the same number of whole rows per matrix), drawn
uniformly with a seed derived from ``seed`` and the parameter name, so it is reproducible and does not
depend on the order of the matrices. Random entries may overlap the critical ones; they are uniform over
the whole matrix.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_folder
from .errors import MaskMismatchError


@dataclass
class AblationResult:
    """What :func:`ablate` zeroed: the number of entries per parameter, and how they were chosen."""

    zeroed: dict[str, int]
    totals: dict[str, int]
    random_control: bool
    seed: int | None
    granularity: str = "weight"
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def num_zeroed(self) -> int:
        return sum(self.zeroed.values())

    @property
    def num_entries(self) -> int:
        return sum(self.totals.values())

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable record (saved as ``ablation.json`` by :func:`save_ablated`)."""
        return {
            "kind": "random_control" if self.random_control else "critical",
            "seed": self.seed,
            "granularity": self.granularity,
            "num_zeroed": self.num_zeroed,
            "num_entries": self.num_entries,
            "fraction_zeroed": self.num_zeroed / self.num_entries if self.num_entries else 0.0,
            "zeroed": self.zeroed,
            "totals": self.totals,
            "mask_provenance": self.provenance,
        }


def _matrix_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _granularity(masks: Any) -> str:
    value = getattr(masks, "granularity", "weight")
    return str(getattr(value, "value", value))  # SafetyMasks gives a Granularity enum


def random_control_mask(mask: torch.Tensor, *, name: str, seed: int = 0, rows: bool = False) -> torch.Tensor:
    """A uniform random bool mask with as many True entries as ``mask`` (or, with ``rows``, as many whole
    True rows), seeded by ``seed`` and ``name``."""
    gen = torch.Generator().manual_seed(_matrix_seed(seed, name))
    out = torch.zeros(mask.shape, dtype=torch.bool)
    if rows:
        row_mask = mask.reshape(mask.shape[0], -1).all(dim=1)
        k = int(row_mask.sum())
        out[torch.randperm(mask.shape[0], generator=gen)[:k]] = True
    else:
        k = int(mask.sum())
        out.view(-1)[torch.randperm(mask.numel(), generator=gen)[:k]] = True
    return out


def _parameters(model: torch.nn.Module, names: list[str]) -> dict[str, torch.nn.Parameter]:
    params = dict(model.named_parameters())
    found, missing = {}, []
    for name in names:
        param = params.get(name)
        if param is None:
            param = params.get(f"base_model.model.{name}")  # a PEFT-wrapped model
        if param is None:
            missing.append(name)
        else:
            found[name] = param
    if missing:
        raise MaskMismatchError(
            f"{len(missing)} masked parameter(s) are not in the model, e.g. {missing[:3]}. The masks were "
            "made for another architecture (or for a model wrapped differently); ablate the plain base model."
        )
    return found


@torch.no_grad()
def ablate(model: torch.nn.Module, masks: Any, *, random_control: bool = False, seed: int = 0) -> AblationResult:
    """Zero, in place, the entries of ``model`` selected by ``masks`` (True = critical).

    ``masks``: a :class:`~safety_peft.masks.SafetyMasks` or any mapping from parameter name
    ("model.layers.0.self_attn.q_proj.weight") to a bool tensor of the parameter's shape. With
    ``random_control=True`` the same number of uniformly random entries of the same matrices is zeroed
    instead (whole random rows for neuron-granularity masks). Returns the counts; the model is modified in
    place (call :func:`save_ablated` to write it).
    """
    names = list(masks)
    granularity = _granularity(masks)
    params = _parameters(model, names)
    selected: dict[str, torch.Tensor] = {}
    for name in names:  # check everything before touching the model
        mask, param = masks[name], params[name]
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"Mask of {name} must be a bool tensor, got {getattr(mask, 'dtype', type(mask))}.")
        if tuple(mask.shape) != tuple(param.shape):
            raise MaskMismatchError(f"Mask of {name} has shape {tuple(mask.shape)}, the parameter {tuple(param.shape)}.")
        if random_control:
            mask = random_control_mask(mask.cpu(), name=name, seed=seed, rows=granularity == "neuron")
        selected[name] = mask
    zeroed, totals = {}, {}
    for name, mask in selected.items():
        param = params[name]
        param.masked_fill_(mask.to(param.device), 0)
        zeroed[name] = int(mask.sum())
        totals[name] = param.numel()
    provenance = getattr(masks, "provenance", None)
    return AblationResult(
        zeroed=zeroed,
        totals=totals,
        random_control=random_control,
        seed=seed if random_control else None,
        granularity=granularity,
        provenance=dict(provenance) if isinstance(provenance, Mapping) else {},
    )


def save_ablated(
    model: torch.nn.Module,
    tokenizer: Any,
    out_dir: str | os.PathLike,
    result: AblationResult | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Save an ablated model (safetensors), its tokenizer and ``ablation.json``, atomically.

    The folder is written next to ``out_dir`` and renamed into place, so it is complete or absent. An
    existing non-empty ``out_dir`` is refused unless ``overwrite``.
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; choose another folder or pass overwrite=True.")
    with atomic_folder(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if result is not None:
            (Path(tmp) / "ablation.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return out


__all__ = ["AblationResult", "ablate", "random_control_mask", "save_ablated"]
