"""Helpers for the safety_freeze tests: random masks for the tiny Llama, and bit-level comparisons."""

from __future__ import annotations

import torch
from torch import nn

from trl import SFTConfig

from safety_peft.masks import SafetyMasks
from safety_peft.provenance import model_fingerprint


def linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in f".{n}"]


def random_masks(
    model: nn.Module, density: float = 0.3, *, neuron: bool = False, seed: int = 1, fingerprint: bool = True,
    names: list[str] | None = None,
) -> SafetyMasks:
    """Random lock masks over the decoder Linears, with the model's fingerprint in the provenance."""
    g = torch.Generator().manual_seed(seed)
    names = names if names is not None else linear_names(model)
    weights = {f"{n}.weight": model.get_submodule(n).weight for n in names}
    if neuron:
        masks = {n: torch.rand(w.shape[0], generator=g) < density for n, w in weights.items()}
        shapes = {n: tuple(w.shape) for n, w in weights.items()}
    else:
        masks = {n: torch.rand(w.shape, generator=g) < density for n, w in weights.items()}
        shapes = None
    provenance = {"base_model": "tiny-llama-test"}
    if fingerprint:
        provenance["model_fingerprint"] = model_fingerprint(model, list(weights))
    return SafetyMasks(
        masks, granularity="neuron" if neuron else "weight", shapes=shapes, provenance=provenance
    )


def bits(t: torch.Tensor) -> torch.Tensor:
    view = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.detach().contiguous().view(view)


def lock_stats(model: nn.Module, reference: dict[str, torch.Tensor], masks: SafetyMasks) -> tuple[int, float]:
    """(locked entries whose bits differ from the reference, share of unlocked entries that changed)."""
    params = dict(model.named_parameters())
    broken, changed, unlocked = 0, 0, 0
    for name in masks.names:
        w, ref, m = params[name], reference[name], masks[name]
        broken += int((bits(w) != bits(ref))[m].sum())
        changed += int((bits(w) != bits(ref))[~m].sum())
        unlocked += int((~m).sum())
    return broken, changed / max(unlocked, 1)


def sft_args(out_dir, **overrides) -> SFTConfig:
    """The SFT settings of the training tests and of the DDP worker they launch (one place)."""
    args = dict(
        output_dir=str(out_dir),
        use_cpu=True,
        bf16=True,  # bf16 autocast on CPU
        gradient_checkpointing=False,  # TRL's default is on; the lock holds either way, this keeps it fast
        max_steps=4,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_grad_norm=1.0,
        weight_decay=0.1,
        learning_rate=1e-2,
        max_length=64,
        save_strategy="no",
        report_to="none",
        logging_steps=1,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    args.update(overrides)
    return SFTConfig(**args)
