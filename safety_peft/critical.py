"""`find_safety_critical`: score safety (and utility), then select by set difference, in one call."""

from __future__ import annotations

from typing import Any, Literal

from torch import nn

from .data import CalibrationData, CalibrationSource
from .masks import SafetyMasks
from .scoring import Method, SafetyScores, SnipVariant, score_model
from .selection import select_critical
from .targets import TargetModules


def find_safety_critical(
    model: nn.Module,
    tokenizer: Any,
    safety_data: CalibrationSource | CalibrationData,
    *,
    utility_data: CalibrationSource | CalibrationData | None = None,
    method: Method | str = "wanda",
    sparsity: float = 0.03,
    utility_sparsity: float | None = None,
    group: str = "layer",
    granularity: str = "weight",
    nsamples: int | None = 128,
    max_length: int = 512,
    batch_size: int = 4,
    target_modules: TargetModules = None,
    seed: int = 0,
    snip_variant: SnipVariant | str = "per_sample",
    chat_template: bool | Literal["auto"] = "auto",
    progress: bool = True,
    return_scores: bool = False,
) -> SafetyMasks | tuple[SafetyMasks, SafetyScores, SafetyScores | None]:
    """Critical = top(S_safety, p) \\ top(S_utility, q) (just top(S_safety, p) without utility data).

    ``utility_sparsity`` defaults to ``sparsity`` when utility data is given. Everything needed to
    recompute the masks later (``rescore``) is recorded in their provenance.
    """
    common = dict(
        nsamples=nsamples, max_length=max_length, batch_size=batch_size, target_modules=target_modules,
        seed=seed, snip_variant=snip_variant, chat_template=chat_template, progress=progress,
    )
    safety = score_model(model, tokenizer, safety_data, method, **common)
    utility = None
    if utility_data is not None:
        utility = score_model(model, tokenizer, utility_data, method, **common)
        if utility_sparsity is None:
            utility_sparsity = sparsity
    masks = select_critical(
        safety, sparsity, utility_scores=utility, utility_sparsity=utility_sparsity or 0.0,
        group=group, granularity=granularity,
    )
    masks.provenance.update(
        batch_size=batch_size,
        chat_template=chat_template,
        requested_nsamples=nsamples,
        utility_data=utility.provenance.get("data") if utility is not None else None,
    )
    if return_scores:
        return masks, safety, utility
    return masks
