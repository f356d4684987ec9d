"""Rescore a fine-tuned model with the settings recorded in the masks' provenance, during or after training.

``rescore(model, tokenizer, before)`` recomputes the critical set with the same method, data, p, q,
group and granularity as ``before`` (any of them can be overridden), so ``compare_masks(before, after)``
measures how fine-tuning moved the safety-critical weights. A ``PeftModel`` is scored on its effective
weights: it is merged into a copy (memory for a second model), never modified.
"""

from __future__ import annotations

import copy
import os
import warnings
from typing import Any

from torch import nn
from transformers import TrainerCallback

from .critical import find_safety_critical
from .data import load_calibration_data
from .errors import CalibrationDataError
from .masks import SafetyMasks
from .scoring import SafetyScores

# Provenance key -> find_safety_critical argument, for the settings a rescoring repeats.
_SETTINGS = {
    "method": "method",
    "sparsity": "sparsity",
    "utility_sparsity": "utility_sparsity",
    "group": "group",
    "granularity": "granularity",
    "max_length": "max_length",
    "seed": "seed",
    "target_modules": "target_modules",
    "snip_variant": "snip_variant",
    "batch_size": "batch_size",
    "chat_template": "chat_template",
}


def clone_model(model: nn.Module) -> nn.Module:
    """A deep copy that runs its own weights.

    accelerate/Trainer replace ``forward`` on the instance by a wrapper whose closure still calls the
    *original* model; a plain deep copy would silently run (and hook) the original. The copy gets the
    class's forward back.
    """
    clone = copy.deepcopy(model)
    for module in clone.modules():
        module.__dict__.pop("forward", None)
    return clone


def effective_model(model: nn.Module) -> nn.Module:
    """The model whose weights are the ones in use: a merged copy of a PeftModel, else the model itself."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        return model
    return clone_model(model).merge_and_unload()


def recorded_settings(masks: SafetyMasks) -> dict[str, Any]:
    """The find_safety_critical arguments recorded in ``masks.provenance``."""
    prov = masks.provenance
    settings = {arg: prov[key] for key, arg in _SETTINGS.items() if prov.get(key) is not None}
    nsamples = prov.get("requested_nsamples", prov.get("nsamples"))
    settings["nsamples"] = nsamples
    return settings


def _recorded_data(record: dict | None, given: Any, what: str) -> Any:
    if given is not None:
        return given
    if not record:
        return None
    source = record.get("source", "")
    if source.startswith("<in-memory"):
        raise CalibrationDataError(
            f"The {what} data of these masks was an in-memory dataset, which cannot be found again; "
            f"pass it explicitly (rescore(..., {'data' if what == 'safety' else 'utility_data'}=...))."
        )
    return source


def _check_fingerprint(record: dict | None, data: Any, tokenizer: Any, settings: dict, what: str) -> Any:
    """Load the data as the original run did, and say so when it is not the data that was recorded."""
    if not record or data is None:
        return data
    calib = load_calibration_data(
        data, tokenizer, nsamples=settings.get("nsamples"), max_length=settings.get("max_length", 512),
        seed=settings.get("seed", 0), split=record.get("split", "train"),
        chat_template=settings.get("chat_template", "auto"),
    )
    if record.get("fingerprint") and calib.fingerprint != record["fingerprint"]:
        warnings.warn(
            f"The {what} data found at {calib.source!r} differs from the data these masks were scored on "
            f"(fingerprint {calib.fingerprint} vs recorded {record['fingerprint']}); the comparison mixes "
            "a change of data with the change of weights.",
            stacklevel=3,
        )
    return calib


def rescore(
    model: nn.Module,
    tokenizer: Any,
    before: SafetyMasks | str | os.PathLike,
    *,
    data: Any = None,
    utility_data: Any = None,
    progress: bool = True,
    return_scores: bool = False,
    **overrides: Any,
) -> SafetyMasks | tuple[SafetyMasks, SafetyScores, SafetyScores | None]:
    """Recompute the critical set of ``model`` with ``before``'s recorded settings (``overrides`` win)."""
    if not isinstance(before, SafetyMasks):
        before = SafetyMasks.from_pretrained(before)
    unknown = set(overrides) - set(_SETTINGS.values()) - {"nsamples"}
    if unknown:
        raise TypeError(f"rescore() got unknown settings {sorted(unknown)}; known: {sorted(_SETTINGS.values())}.")
    settings = {**recorded_settings(before), **overrides}
    if "method" not in settings:
        raise CalibrationDataError("These masks record no scoring method; pass method=... to rescore them.")
    prov = before.provenance
    safety = _recorded_data(prov.get("data"), data, "safety")
    if safety is None and settings["method"] in ("wanda", "snip"):
        raise CalibrationDataError("These masks record no calibration data; pass data=... to rescore them.")
    utility = _recorded_data(prov.get("utility_data"), utility_data, "utility")
    safety = _check_fingerprint(prov.get("data"), safety, tokenizer, settings, "safety")
    utility = _check_fingerprint(prov.get("utility_data"), utility, tokenizer, settings, "utility")
    if utility is None:
        settings.pop("utility_sparsity", None)

    target = effective_model(model)
    result = find_safety_critical(
        target, tokenizer, safety, utility_data=utility, progress=progress, return_scores=True, **settings
    )
    masks = result[0]
    masks.provenance["rescored_from"] = {
        "model_fingerprint": prov.get("model_fingerprint"), "base_model": prov.get("base_model"),
    }
    return result if return_scores else masks


class RescoreCallback(TrainerCallback):
    """Rescore every ``every_n_steps`` optimizer steps and/or at the end of training; log Jaccard and overlap.

    The metrics go to the trainer's log history (and to the next ``on_log``, so reporters such as
    TensorBoard see them) as ``rescore/jaccard``, ``rescore/overlap`` and ``rescore/new_critical``; the
    masks of each rescoring are saved under ``<output_dir>/rescore/step-<N>`` on the main process. Under
    several processes every rank scores its share of the data (all ranks must run the callback).
    """

    def __init__(
        self,
        before: SafetyMasks | str | os.PathLike,
        tokenizer: Any,
        *,
        every_n_steps: int | None = None,
        at_end: bool = True,
        output_dir: str | os.PathLike | None = None,
        data: Any = None,
        utility_data: Any = None,
        **overrides: Any,
    ):
        if every_n_steps is not None and every_n_steps <= 0:
            raise ValueError(f"every_n_steps must be positive, got {every_n_steps}.")
        self.before = before if isinstance(before, SafetyMasks) else SafetyMasks.from_pretrained(before)
        self.tokenizer = tokenizer
        self.every_n_steps = every_n_steps
        self.at_end = at_end
        self.output_dir = output_dir
        self.kwargs = dict(data=data, utility_data=utility_data, **overrides)
        self.history: list[dict[str, Any]] = []
        self._pending: dict[str, float] = {}

    def _rescore(self, args, state, model) -> None:
        from .compare import compare_masks

        after = rescore(model, self.tokenizer, self.before, progress=False, **self.kwargs)
        summary = compare_masks(self.before, after).summary
        metrics = {
            "rescore/jaccard": summary["jaccard"],
            "rescore/overlap": summary["overlap"],
            "rescore/new_critical": summary["new_critical"],
        }
        record = {"step": state.global_step, **metrics}
        self.history.append(record)
        state.log_history.append(record)
        self._pending.update(metrics)
        if state.is_world_process_zero:
            out = os.path.join(self.output_dir or args.output_dir, "rescore", f"step-{state.global_step}")
            after.save_pretrained(out)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every_n_steps and state.global_step % self.every_n_steps == 0:
            self._rescore(args, state, model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        already = self.history and self.history[-1]["step"] == state.global_step
        if self.at_end and not already:
            self._rescore(args, state, model)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and self._pending:
            logs.update(self._pending)
            self._pending = {}
