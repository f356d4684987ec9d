"""One rank of a 2-process CPU (gloo) SFT run with safety_freeze; launched by tests/test_training.py.

Every rank builds the same seeded tiny Llama and masks, trains with TRL's SFTTrainer (which wraps the
model in DistributedDataParallel), and writes a digest of its trained update; rank 0 saves the adapter.
The test then checks that the ranks agree and that the lock held.
"""

import hashlib
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _tuner_utils import random_masks, sft_args  # noqa: E402
from datasets import Dataset
from tiny import chat_rows, make_llama, make_tokenizer
from trl import SFTTrainer

import safety_peft.tuners  # noqa: F401
from safety_peft.callbacks import lock_trainer
from safety_peft.tuners.safety_freeze import SafetyFreezeConfig


def main(out_dir: str, adapter: str) -> None:
    torch.set_num_threads(1)
    masks = random_masks(make_llama(0), 0.3)
    args = sft_args(out_dir)
    trainer = SFTTrainer(
        model=make_llama(0),
        args=args,
        train_dataset=Dataset.from_list(chat_rows(16)),
        processing_class=make_tokenizer(),
        peft_config=SafetyFreezeConfig(masks=masks, adapter=adapter, r=4),
    )
    check = lock_trainer(trainer)
    trainer.train()
    rank = trainer.args.process_index
    digest = hashlib.sha256()
    for name, param in sorted(trainer.model.named_parameters()):
        if param.requires_grad:
            digest.update(name.encode() + param.detach().cpu().numpy().tobytes())
    report = {
        "rank": rank,
        "world_size": trainer.args.world_size,
        "wrapped": type(trainer.model_wrapped).__name__,
        "digest": digest.hexdigest(),
        "lock_ok": check.report.ok,
        "num_locked": check.report.num_locked,
    }
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    if rank == 0:
        trainer.model.save_pretrained(os.path.join(out_dir, "adapter"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "delta")
