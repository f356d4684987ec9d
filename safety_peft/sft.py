"""One way to build the short TRL fine-tunes the demo runs (the aligned base and the benign fine-tunes).

Why padding-free: the built-in rows range from ~40 to ~300 tokens, so a right-padded batch of 8 is about
half padding, and on a CPU every padded token costs as much as a real one. With ``padding_free=True`` TRL
concatenates the batch into one row with restarting ``position_ids``; transformers then builds a
block-diagonal causal mask from them (sdpa and eager attention), so the loss and gradients equal the
padded batch's (checked in ``tests/test_sft.py``) in about half the time. The batches, their order and
the number of optimizer steps are unchanged.

Why the model's own loss: TRL 1.16's ``SFTTrainer`` computes the loss with a fused LM-head kernel that, off
GPU, runs the vocabulary projection in float32 tiles; on a CPU with bf16 matrix units that was 40% of each
step of the aligned base's training (profiled: ~2 s of ~5 s). :class:`PlainLossSFTTrainer` lets the model
compute its usual causal-LM loss instead (the projection under bf16 autocast, cross-entropy in float32),
which is the same mean over completion tokens (checked in ``tests/test_sft.py``). It skips TRL's entropy
and token-accuracy metrics, which come from the fused kernel. Side by side on the real rows
(``benchmarks/bench_demo_sft.py``): padding-free 0.49x of TRL's default step time, with the model's own
loss as well 0.34x.

TRL does not truncate in padding-free mode without packing, so rows longer than ``max_length`` are cut
here, after TRL has tokenized them, exactly as TRL's own truncation would (keep the first tokens).
"""

from __future__ import annotations

from typing import Any

import torch
from datasets import Dataset
from transformers import Trainer
from trl import SFTConfig, SFTTrainer


class PlainLossSFTTrainer(SFTTrainer):
    """``SFTTrainer`` whose loss is the model's own causal-LM loss (see the module docstring)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs["use_cache"] = False  # a cache would switch off the packed-sequence attention mask
        return Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)


def cpu_friendly_sft_trainer(
    model,
    tokenizer,
    rows: list[dict[str, Any]],
    *,
    output_dir: str,
    max_length: int | None,
    progress: bool = True,
    peft_config=None,
    trainer_cls: type[SFTTrainer] = PlainLossSFTTrainer,
    **sft_args: Any,
):
    """A padding-free :class:`PlainLossSFTTrainer` on ``rows``: bf16 autocast, no checkpoints, no reporting.

    ``sft_args`` are passed to ``SFTConfig`` (learning rate, epochs, batch size, seed, ...);
    ``trainer_cls=SFTTrainer`` and ``padding_free=False`` give TRL's defaults back
    (``benchmarks/bench_demo_sft.py`` compares them).
    """
    if not rows:
        raise ValueError("No training rows.")
    defaults = dict(
        use_cpu=not torch.cuda.is_available(),
        bf16=True,  # autocast; master weights stay float32. The CPUs here have bf16 matrix units.
        activation_checkpointing=False,  # models this small fit; checkpointing only costs time
        padding_free=True,
        save_strategy="no",
        report_to="none",
        logging_steps=5,
        dataloader_num_workers=0,
    )
    defaults.update(sft_args)
    config = SFTConfig(output_dir=output_dir, max_length=None, disable_tqdm=not progress, **defaults)
    trainer = trainer_cls(model=model, args=config, train_dataset=Dataset.from_list(rows),
                          processing_class=tokenizer, peft_config=peft_config)
    if max_length is not None:
        trainer.train_dataset = truncate_tokenized(trainer.train_dataset, max_length)
    return trainer


def truncate_tokenized(dataset, max_length: int):
    """Keep the first ``max_length`` tokens of every row (and of the other per-token columns)."""
    if max_length <= 0:
        raise ValueError(f"max_length must be positive, got {max_length}.")
    if max(len(ids) for ids in dataset["input_ids"]) <= max_length:
        return dataset

    def cut(row: dict[str, Any]) -> dict[str, Any]:
        n = len(row["input_ids"])
        return {k: v[:max_length] if isinstance(v, list) and len(v) == n else v for k, v in row.items()}

    return dataset.map(cut, desc="Truncating")


__all__ = ["PlainLossSFTTrainer", "cpu_friendly_sft_trainer", "truncate_tokenized"]
