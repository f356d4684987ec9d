"""Run under torchrun/accelerate with 2 CPU processes: each rank scores its share, accumulators are summed."""

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from tiny import chat_rows, make_llama, make_tokenizer  # noqa: E402

from safety_peft.critical import find_safety_critical  # noqa: E402


def main(out_dir: str, method: str) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    masks, scores, _ = find_safety_critical(
        make_llama(0), make_tokenizer(), chat_rows(7), utility_data=chat_rows(3)[::-1], method=method,
        sparsity=0.2, utility_sparsity=0.1, batch_size=2, progress=False, return_scores=True,
    )
    rank = dist.get_rank()
    masks.save_pretrained(os.path.join(out_dir, f"masks_rank{rank}"))
    scores.save(os.path.join(out_dir, f"scores_rank{rank}.safetensors"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
