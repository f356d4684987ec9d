"""Fine-tuning with TRL's SFTTrainer and SafetyFreezeConfig: the locked entries come out bit-identical.

Each run uses AdamW with weight decay 0.1, gradient accumulation 2, gradient clipping and bf16 autocast on
CPU: everything that could nudge a locked entry if the lock were `W + Δ·(1-M)` or a post-step restore.
"""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from _tuner_utils import lock_stats, random_masks, sft_args
from datasets import Dataset
from peft import PeftModel
from tiny import chat_rows, make_llama, make_tokenizer
from trl import SFTTrainer

import safety_peft.tuners  # noqa: F401
from safety_peft.callbacks import lock_trainer
from safety_peft.tuners.safety_freeze import SafetyFreezeConfig
from safety_peft.verification import verify_lock

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def make_trainer(out_dir, config, **overrides):
    return SFTTrainer(
        model=make_llama(0),
        args=sft_args(out_dir, **overrides),
        train_dataset=Dataset.from_list(chat_rows(16)),
        processing_class=make_tokenizer(),
        peft_config=config,
    )


def base_state():
    return {k: v.clone() for k, v in make_llama(0).state_dict().items()}


@pytest.mark.parametrize(
    "adapter,neuron", [("delta", False), ("lora", False), ("delta", True), ("lora", True)]
)
def test_sft_keeps_locked_entries_bit_identical(tmp_path, adapter, neuron):
    masks = random_masks(make_llama(0), 0.3, neuron=neuron)
    trainer = make_trainer(tmp_path, SafetyFreezeConfig(masks=masks, adapter=adapter, r=4))
    check = lock_trainer(trainer)
    trainer.train()
    assert check.report.ok and check.report.num_locked == masks.num_locked

    trainer.model.save_pretrained(tmp_path / "adapter")
    reference = base_state()
    merged = trainer.model.merge_and_unload()
    broken, changed = lock_stats(merged, reference, masks)
    assert broken == 0
    assert changed > 0.9, f"only {changed:.0%} of the unlocked entries changed"

    reloaded = PeftModel.from_pretrained(make_llama(0), tmp_path / "adapter").merge_and_unload()
    broken, changed_again = lock_stats(reloaded, reference, masks)
    assert broken == 0 and changed_again == changed
    for name in masks.names:
        assert torch.equal(reloaded.get_parameter(name), merged.get_parameter(name))
    report = verify_lock(reloaded, masks, reference)
    assert report.ok and report.max_abs_change == 0.0


def test_checkpoint_and_resume_give_the_uninterrupted_result(tmp_path):
    masks = random_masks(make_llama(0), 0.3)
    full = make_trainer(tmp_path / "full", SafetyFreezeConfig(masks=masks))
    full.train()
    expected = {n: p.detach().clone() for n, p in full.model.named_parameters() if p.requires_grad}

    first = make_trainer(tmp_path / "run", SafetyFreezeConfig(masks=masks), save_strategy="steps", save_steps=2)
    first.train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").exists()
    config = json.loads((checkpoint / "adapter_config.json").read_text())
    assert config["peft_type"] == "SAFETY_FREEZE" and config["masks"] is None

    resumed = make_trainer(tmp_path / "run", SafetyFreezeConfig(masks=masks), save_strategy="steps", save_steps=2)
    check = lock_trainer(resumed)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert check.report.ok
    got = {n: p.detach() for n, p in resumed.model.named_parameters() if p.requires_grad}
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7)
    broken, _ = lock_stats(resumed.model.merge_and_unload(), base_state(), masks)
    assert broken == 0


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("adapter", ["delta"])
def test_two_process_ddp_training_on_cpu_keeps_the_lock(tmp_path, adapter):
    """accelerate launch (torchrun underneath), 2 processes, gloo: the ranks agree and the lock holds."""
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", os.path.join(ROOT, "recipes", "accelerate_configs", "ddp_cpu.yaml"),
        "--main_process_port", str(_free_port()),
        os.path.join(HERE, "ddp_train_worker.py"), str(tmp_path), adapter,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world_size"] == 2 and r["wrapped"] == "DistributedDataParallel" for r in reports)
    assert reports[0]["digest"] == reports[1]["digest"]  # DDP kept the replicas identical
    assert all(r["lock_ok"] for r in reports)

    masks = random_masks(make_llama(0), 0.3)
    reference = base_state()
    merged = PeftModel.from_pretrained(make_llama(0), tmp_path / "adapter").merge_and_unload()
    broken, changed = lock_stats(merged, reference, masks)
    assert broken == 0 and changed > 0.9


def test_recipe_trains_with_masks_from_a_folder_and_a_yaml_config(tmp_path):
    """recipes/sft_safety_freeze.py end to end on a saved tiny model: YAML config, masks folder, lock check."""
    model_dir, masks_dir, out_dir = tmp_path / "model", tmp_path / "masks", tmp_path / "out"
    make_llama(0).save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    masks = random_masks(make_llama(0), 0.3)
    masks.save_pretrained(masks_dir)
    data = tmp_path / "chats.jsonl"
    data.write_text("\n".join(json.dumps(row) for row in chat_rows(16)))
    (tmp_path / "run.yaml").write_text(
        f"model_name_or_path: {model_dir}\ndataset_name: {data}\nmasks: {masks_dir}\nadapter: lora\nlora_r: 4\n"
        f"output_dir: {out_dir}\nuse_cpu: true\nbf16: true\ngradient_checkpointing: false\nmax_steps: 3\n"
        "per_device_train_batch_size: 2\ngradient_accumulation_steps: 2\nmax_grad_norm: 1.0\nweight_decay: 0.1\n"
        "learning_rate: 0.01\nmax_length: 64\nsave_strategy: 'no'\nreport_to: none\ndisable_tqdm: true\n"
    )
    cmd = [sys.executable, os.path.join(ROOT, "recipes", "sft_safety_freeze.py"), "--config", str(tmp_path / "run.yaml")]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "safety lock: lock holds" in out.stdout
    merged = PeftModel.from_pretrained(make_llama(0), out_dir).merge_and_unload()
    broken, changed = lock_stats(merged, base_state(), masks)
    assert broken == 0 and changed > 0.9


def test_sft_with_trl_default_gradient_checkpointing(tmp_path):
    """TRL turns gradient checkpointing on by default; the lock's autograd function is recomputed under it."""
    masks = random_masks(make_llama(0), 0.3)
    trainer = make_trainer(tmp_path, SafetyFreezeConfig(masks=masks), gradient_checkpointing=True)
    trainer.train()
    broken, changed = lock_stats(trainer.model.merge_and_unload(), base_state(), masks)
    assert broken == 0 and changed > 0.9
