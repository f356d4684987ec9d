"""``SafetyFreezeConfig``: fine-tune with PEFT while the safety-critical entries keep their base bits."""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from peft.config import PeftConfig
from peft.utils import PeftType

if TYPE_CHECKING:
    from safety_peft.masks import SafetyMasks

PEFT_METHOD_NAME = "safety_freeze"
PEFT_TYPE_NAME = PEFT_METHOD_NAME.upper()

# Output heads are never tuner targets: TRL computes log-probabilities from lm_head.weight directly.
_OUTPUT_HEADS = ("lm_head", "embed_out", "output_projection")


@dataclass
class SafetyFreezeConfig(PeftConfig):
    """Configuration of the ``safety_freeze`` PEFT method.

    Every targeted ``nn.Linear`` gets the effective weight ``where(M, W, W + Δ)``: entries locked by the
    mask ``M`` stay the base weight's bits whatever the optimizer, precision or number of processes. Δ is
    a dense trainable tensor (``adapter="delta"``) or a LoRA product (``adapter="lora"``).

    The masks are not part of ``adapter_config.json``: ``save_pretrained`` stores them, compactly encoded,
    in ``adapter_model.safetensors`` next to Δ, and only their small header (shapes, encodings, checksum,
    provenance) goes into the config, so an adapter folder is self-contained.
    """

    masks: str | SafetyMasks | None = field(
        default=None,
        metadata={
            "help": (
                "The lock masks: a SafetyMasks object, a mask artifact folder, a safety_masks.safetensors file "
                "or a Hub repo id. Not saved in the config: an adapter saved with save_pretrained carries its "
                "masks in adapter_model.safetensors, so leave this empty when loading one."
            )
        },
    )
    masks_revision: str | None = field(
        default=None, metadata={"help": "Hub revision (branch, tag or commit) when `masks` is a repo id."}
    )
    adapter: Literal["delta", "lora"] = field(
        default="delta",
        metadata={
            "help": (
                "'delta': a dense trainable update of each target weight, i.e. full fine-tuning of every "
                "unlocked entry. 'lora': the update is (lora_alpha / r) * B @ A."
            )
        },
    )
    r: int = field(default=8, metadata={"help": "LoRA rank (adapter='lora' only)."})
    lora_alpha: float = field(default=16, metadata={"help": "LoRA scaling numerator: the update is alpha/r * B @ A."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input (adapter='lora' only)."})
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": (
                "Modules to lock and train, as in PEFT: a list of names or name suffixes, or a regex matched "
                "against the full module name. Default: exactly the modules the masks cover. Every targeted "
                "module needs a mask; output heads (lm_head) are never targets."
            )
        },
    )
    modules_to_save: list[str] | None = field(
        default=None,
        metadata={
            "help": (
                "Extra modules trained in full and saved with the adapter (e.g. a classification head). "
                "They are not locked."
            )
        },
    )
    check_fingerprint: bool = field(
        default=True,
        metadata={
            "help": (
                "Refuse masks whose recorded weight fingerprint differs from the model's (masks computed on "
                "another model or checkpoint). Set False only to apply masks to a fine-tuned model of the "
                "same base on purpose."
            )
        },
    )
    init_weights: bool = field(
        default=True,
        metadata={
            "help": (
                "Start from the base model (Δ = 0, LoRA B = 0). False starts from a small random update; "
                "only useful for tests."
            )
        },
    )
    masks_header: dict[str, Any] | None = field(
        default=None,
        metadata={
            "help": (
                "Filled in when the adapter is created: the encoding header of the masks stored in "
                "adapter_model.safetensors (shapes, encodings, checksum, provenance). Do not set by hand."
            )
        },
    )
    masks_source: str | None = field(
        default=None,
        metadata={"help": "Filled in when the adapter is created: where the masks came from (informational)."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType(PEFT_TYPE_NAME)
        if self.adapter not in ("delta", "lora"):
            raise ValueError(f"adapter must be 'delta' or 'lora', got {self.adapter!r}.")
        if self.adapter == "lora":
            if not isinstance(self.r, int) or self.r <= 0:
                raise ValueError(f"r must be a positive integer, got {self.r!r}.")
            if not 0.0 <= self.lora_dropout < 1.0:
                raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}.")
        if isinstance(self.masks, os.PathLike):
            self.masks = os.fspath(self.masks)
        if self.masks is not None and not isinstance(self.masks, str):
            from safety_peft.masks import SafetyMasks

            if not isinstance(self.masks, SafetyMasks):
                raise TypeError(
                    "masks must be a SafetyMasks object, a folder or file path, or a Hub repo id; got "
                    f"{type(self.masks).__name__}."
                )
        if isinstance(self.target_modules, (list, tuple, set)):
            self.target_modules = list(self.target_modules)
        check_not_output_head(self.target_modules)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able config: the masks object itself is left out (it lives in the adapter weights)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "masks":
                value = None
            out[f.name] = copy.deepcopy(value)
        if out["masks_source"] is None:
            out["masks_source"] = describe_masks(self.masks)
        return out

    def __deepcopy__(self, memo: dict) -> SafetyFreezeConfig:
        # the masks object is immutable in use: share it instead of copying every bool tensor
        clone = copy.copy(self)
        for f in dataclasses.fields(self):
            if f.name != "masks":
                setattr(clone, f.name, copy.deepcopy(getattr(self, f.name), memo))
        return clone


def describe_masks(masks: Any) -> str | None:
    """A short JSON-able description of where masks came from."""
    if masks is None:
        return None
    if isinstance(masks, str):
        return masks
    base = getattr(masks, "provenance", {}).get("base_model")
    return f"SafetyMasks object ({len(masks)} weights" + (f", base model {base})" if base else ")")


def check_not_output_head(target_modules: Any) -> None:
    """Refuse ``lm_head`` (and other output heads) as a target with a message saying why."""
    if target_modules is None:
        return
    from safety_peft.errors import UnsupportedModuleError

    names = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    for name in names:
        last = name.split(".")[-1]
        if last in _OUTPUT_HEADS or name in _OUTPUT_HEADS:
            raise UnsupportedModuleError(
                f"target_modules contains {name!r}, the output head: safety_freeze never targets it (TRL "
                "computes log-probabilities from lm_head.weight directly, so a tuner layer there is never "
                "trained). Train it in full with modules_to_save=['lm_head'] if you must."
            )
