"""Supervised fine-tuning with TRL while the safety-critical weights stay locked (SafetyFreezeConfig).

The same script as TRL's `trl/scripts/sft.py`, with one changed line: `peft_config=SafetyFreezeConfig(...)`.
Masks come from `--masks` (a folder, a safety_masks.safetensors file or a Hub repo id), or are computed
first from `--safety_data` (and `--utility_data`) with `safety_peft.find_safety_critical`.

    python recipes/sft_safety_freeze.py --config recipes/sft_safety_freeze.yaml
    accelerate launch --config_file recipes/accelerate_configs/ddp.yaml \
        recipes/sft_safety_freeze.py --config recipes/sft_safety_freeze.yaml
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field


@dataclass
class ScriptArguments:
    model_name_or_path: str = field(metadata={"help": "Base (aligned) model: a Hub id or a local folder."})
    dataset_name: str = field(
        metadata={"help": "Training data: a Hub dataset id, a folder, a .json/.jsonl file or builtin:<name>."}
    )
    dataset_split: str = field(default="train", metadata={"help": "Split to train on."})
    dtype: str = field(default="float32", metadata={"help": "Dtype to load the base model in (float32, bfloat16)."})
    masks: str | None = field(
        default=None, metadata={"help": "Lock masks: a mask folder, a safety_masks.safetensors file or a Hub repo id."}
    )
    masks_revision: str | None = field(default=None, metadata={"help": "Hub revision of --masks."})
    safety_data: str | None = field(
        default=None, metadata={"help": "Without --masks: calibration data to find the safety-critical weights."}
    )
    utility_data: str | None = field(
        default=None, metadata={"help": "Without --masks: utility data whose top weights are left unlocked."}
    )
    method: str = field(default="wanda", metadata={"help": "Scoring method: wanda, snip, magnitude or random."})
    sparsity: float = field(default=0.03, metadata={"help": "Share p of top safety scores (per group)."})
    utility_sparsity: float | None = field(default=None, metadata={"help": "Share q of top utility scores."})
    granularity: str = field(default="weight", metadata={"help": "Lock single entries ('weight') or rows ('neuron')."})
    nsamples: int = field(default=128, metadata={"help": "Calibration samples used for scoring."})
    adapter: str = field(default="delta", metadata={"help": "'delta' (full fine-tuning of unlocked entries) or 'lora'."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (adapter='lora')."})
    lora_alpha: float = field(default=32, metadata={"help": "LoRA alpha (adapter='lora')."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout (adapter='lora')."})
    target_modules: list[str] | None = field(
        default=None, metadata={"help": "Modules to train and lock; default: exactly the masked modules."}
    )
    check_lock: bool = field(default=True, metadata={"help": "Verify at the end of training that no locked entry moved."})


def main(script_args: ScriptArguments, training_args) -> None:
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTTrainer

    import safety_peft
    from safety_peft.callbacks import lock_trainer
    from safety_peft.tuners.safety_freeze import SafetyFreezeConfig

    model = AutoModelForCausalLM.from_pretrained(script_args.model_name_or_path, dtype=getattr(torch, script_args.dtype))
    tokenizer = AutoTokenizer.from_pretrained(script_args.model_name_or_path)
    data = script_args.dataset_name
    if data.startswith("builtin:"):
        from safety_peft.builtin_datasets import load_builtin

        dataset = load_builtin(data.split(":", 1)[1])
    elif data.endswith((".json", ".jsonl")):
        dataset = load_dataset("json", data_files=data, split=script_args.dataset_split)
    else:
        dataset = load_dataset(data, split=script_args.dataset_split)

    masks = script_args.masks
    if masks is None:
        if script_args.safety_data is None:
            raise ValueError("pass --masks, or --safety_data to compute them first")
        masks = safety_peft.find_safety_critical(  # every rank takes part: scoring is distributed too
            model, tokenizer, script_args.safety_data, utility_data=script_args.utility_data,
            method=script_args.method, sparsity=script_args.sparsity, utility_sparsity=script_args.utility_sparsity,
            granularity=script_args.granularity, nsamples=script_args.nsamples,
        )
        if training_args.process_index == 0:
            masks.save_pretrained(os.path.join(training_args.output_dir, "safety_masks"))

    peft_config = SafetyFreezeConfig(  # the one line that differs from a plain TRL SFT script
        masks=masks, masks_revision=script_args.masks_revision, adapter=script_args.adapter, r=script_args.lora_r,
        lora_alpha=script_args.lora_alpha, lora_dropout=script_args.lora_dropout,
        target_modules=script_args.target_modules,
    )
    trainer = SFTTrainer(
        model=model, args=training_args, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config
    )
    if script_args.check_lock:
        check = lock_trainer(trainer)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    if script_args.check_lock:
        trainer.accelerator.print(f"safety lock: {check.report}")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    trainer.end()


if __name__ == "__main__":
    from trl import SFTConfig, TrlParser

    parser = TrlParser((ScriptArguments, SFTConfig))
    script_args, training_args = parser.parse_args_and_config()
    main(script_args, training_args)
