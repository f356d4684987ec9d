"""Why the demo's SFT is padding-free with the model's own loss: step times side by side in one run (CPU).

Trains the embedded SmolLM2-135M-Instruct on the aligned base's real training rows (batch 8, bf16 autocast,
AdamW) in three variants built by ``safety_peft.sft.cpu_friendly_sft_trainer``, on the same batches:

- ``trl_padded``: TRL 1.16's defaults: right-padded batches, TRL's fused LM-head loss;
- ``trl_padding_free``: padding-free batches, TRL's fused LM-head loss;
- ``demo``: padding-free batches, the model's own loss (``PlainLossSFTTrainer``), what the demo runs.

Each variant runs ``--steps`` optimizer steps after one warm-up step, in interleaved rounds (A, B, C, A, ...)
so that load from other processes hits all alike; the medians of the per-step times are compared.

    python benchmarks/bench_demo_sft.py                 # 6 steps x 2 rounds, a few minutes
    python benchmarks/bench_demo_sft.py --steps 10 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

# Sleeping OpenMP waits keep a shared 2-core machine's load from distorting the comparison (bench_training.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from transformers import TrainerCallback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

VARIANTS = ("trl_padded", "trl_padding_free", "demo")


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step (forward, backward, clipping, AdamW)."""

    def __init__(self):
        self.times: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


def run(variant: str, rows, steps: int, model_name: str) -> tuple[list[float], int]:
    """Per-step times after the warm-up step, and the number of tokens the batches fed the model."""
    from trl import SFTTrainer

    from safety_peft.default_model import load_model_and_tokenizer
    from safety_peft.sft import cpu_friendly_sft_trainer

    model, tokenizer = load_model_and_tokenizer(model_name, dtype=torch.float32)
    extra = {} if variant == "demo" else {"trainer_cls": SFTTrainer}
    if variant == "trl_padded":
        extra["padding_free"] = False
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out:
        trainer = cpu_friendly_sft_trainer(
            model, tokenizer, rows, output_dir=out, max_length=512, progress=False, max_steps=steps + 1,
            per_device_train_batch_size=8, learning_rate=2e-5, completion_only_loss=True, seed=0, data_seed=0,
            logging_strategy="no",
            **extra,
        )
        trainer.add_callback(timer)
        fed = sum(batch["input_ids"].numel() for _, batch in zip(range(steps + 1), trainer.get_train_dataloader()))
        trainer.train()
    return timer.times[1:], fed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model", default="default")
    args = parser.parse_args()

    from safety_peft.alignment import training_rows

    rows = training_rows()
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    tokens: dict[str, int] = {}
    for r in range(args.rounds):
        for variant in VARIANTS:
            step_times, tokens[variant] = run(variant, rows, args.steps, args.model)
            times[variant] += step_times
            print(f"round {r + 1} {variant:>17}: {statistics.median(step_times):.2f} s/step", flush=True)

    median = {v: statistics.median(t) for v, t in times.items()}
    print(f"\nbatch 8 of the aligned base's rows, {args.steps} steps x {args.rounds} rounds, "
          f"{torch.get_num_threads()} threads")
    print(f"{'variant':>17}  s/step  tokens fed  vs trl_padded")
    for v in VARIANTS:
        print(f"{v:>17}  {median[v]:6.2f}  {tokens[v]:10d}  {median[v] / median['trl_padded']:.3f}")
    print(f"ratio demo / trl_padding_free (the loss alone): {median['demo'] / median['trl_padding_free']:.3f}")


if __name__ == "__main__":
    main()
