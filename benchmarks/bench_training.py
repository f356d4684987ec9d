"""What the lock costs during training, measured side by side in one run on the same batches (CPU).

Compares, on a Llama-like model built from a config (no download; >= 50M parameters):

- ``delta`` (SafetyFreezeConfig, dense update, 3 % of entries locked) against plain full fine-tuning of
  the same weights (every decoder Linear trainable, AdamW): step time and memory;
- ``lora`` with neuron masks (3 % of rows locked) against PEFT's own LoRA at the same rank: step time.

Step times are medians over interleaved repetitions (A, B, C, D, A, B, ...), so load from other processes
hits every variant alike; the CPU time of this process is printed too, as it is less sensitive to such
load than wall time (the targets are judged on wall time). Memory is reported two ways: the summed bytes of the tensors a step keeps
(parameters, buffers, gradients, optimizer state and the decoded locks), and the peak RSS growth of a
fresh process per variant that builds the model and runs two steps (this one includes activations).

    python benchmarks/bench_training.py            # bf16 autocast, 2 threads (OMP_WAIT_POLICY=PASSIVE)
    python benchmarks/bench_training.py --dtype fp32 --reps 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

# OpenMP threads that spin while waiting turn a shared, busy 2-core machine into 10x slower, erratic steps
# (measured here: 12 s instead of 1.3 s); sleeping waits keep the comparison about the code. Must be set
# before torch starts its thread pool.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

VARIANTS = ("full", "delta", "peft_lora", "lock_lora")


def model_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=8192, hidden_size=768, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=12,
        num_key_value_heads=4, max_position_embeddings=1024, tie_word_embeddings=True,
    )


def target_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n]


def build(variant: str, rank: int, density: float):
    """A fresh seeded model prepared for ``variant``, and its AdamW optimizer."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    import safety_peft.tuners  # noqa: F401
    from safety_peft.masks import SafetyMasks
    from safety_peft.tuners.safety_freeze import SafetyFreezeConfig

    torch.manual_seed(0)
    model = LlamaForCausalLM(model_config())
    names = target_names(model)
    g = torch.Generator().manual_seed(1)
    if variant == "full":
        model.requires_grad_(False)
        for n in names:
            model.get_submodule(n).weight.requires_grad_(True)
    elif variant == "delta":
        masks = SafetyMasks({f"{n}.weight": torch.rand(model.get_submodule(n).weight.shape, generator=g) < density for n in names})
        model = get_peft_model(model, SafetyFreezeConfig(masks=masks))
    elif variant == "lock_lora":
        shapes = {f"{n}.weight": tuple(model.get_submodule(n).weight.shape) for n in names}
        rows = {k: torch.rand(s[0], generator=g) < density for k, s in shapes.items()}
        masks = SafetyMasks(rows, granularity="neuron", shapes=shapes)
        model = get_peft_model(model, SafetyFreezeConfig(masks=masks, adapter="lora", r=rank, lora_alpha=2 * rank))
    elif variant == "peft_lora":
        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=names, lora_dropout=0.0))
    else:
        raise ValueError(variant)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(params, lr=1e-5, weight_decay=0.1)


def batches(n: int, batch: int, seq: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, model_config().vocab_size, (batch, seq), generator=g) for _ in range(n)]


def step(model, optimizer, ids: torch.Tensor, bf16: bool) -> tuple[float, float]:
    """One training step; returns (wall seconds, CPU seconds of this process)."""
    start, cpu = time.perf_counter(), time.process_time()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start, time.process_time() - cpu


def kept_tensor_bytes(model, optimizer) -> int:
    """Bytes of parameters, buffers, gradients, optimizer state and decoded locks, each tensor counted once."""
    from safety_peft.tuners.safety_freeze.layer import SafetyFreezeLayer

    seen, total = set(), 0

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()

    for p in model.parameters():
        add(p)
        if p.requires_grad:  # its gradient exists from backward to zero_grad (set to None after a step)
            total += p.numel() * p.element_size()
    for b in model.buffers():
        add(b)
    for state in optimizer.state.values():
        for v in state.values():
            add(v)
    for m in model.modules():
        if isinstance(m, SafetyFreezeLayer):
            for _, lock in m._locks.values():
                for t in (lock.rows, lock.flat, lock.mask):
                    add(t)
    return total


def rss_child(variant: str, args) -> None:
    """Run in a fresh process: peak RSS growth (MiB) over building the model and two training steps."""
    torch.set_num_threads(args.threads)
    import peft  # noqa: F401  (import the libraries before the baseline)
    import transformers  # noqa: F401

    import safety_peft.tuners  # noqa: F401

    ids = batches(2, args.batch, args.seq)
    baseline = _rss_mib()
    model, opt = build(variant, args.rank, args.density)
    for x in ids:
        step(model, opt, x, args.dtype == "bf16")
    print(json.dumps({"peak_rss_growth_mib": _peak_rss_mib() - baseline}))


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def _rss_mib() -> float:
    return _status_mib("VmRSS")


def _peak_rss_mib() -> float:
    # VmHWM belongs to this process image; getrusage's ru_maxrss would carry the parent's peak over exec
    return _status_mib("VmHWM")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="bf16 autocast or plain fp32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--reps", type=int, default=7, help="timed steps per variant (after one warm-up step)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank for both LoRA variants")
    parser.add_argument("--density", type=float, default=0.03, help="share of entries (or rows) locked")
    parser.add_argument("--rss-child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        return rss_child(args.rss_child, args)

    torch.set_num_threads(args.threads)
    bf16 = args.dtype == "bf16"
    built = {v: build(v, args.rank, args.density) for v in VARIANTS}
    n_params = sum(p.numel() for p in built["full"][0].parameters())
    n_target = sum(p.numel() for p in built["full"][0].parameters() if p.requires_grad)
    ids = batches(args.reps + 1, args.batch, args.seq)
    times = {v: [] for v in VARIANTS}
    cpu_times = {v: [] for v in VARIANTS}
    for i, x in enumerate(ids):  # interleaved: every variant sees the same batch in turn
        for v in VARIANTS:
            wall, cpu = step(*built[v], x, bf16)
            if i > 0:
                times[v].append(wall)
                cpu_times[v].append(cpu)
    median = {v: statistics.median(times[v]) for v in VARIANTS}
    cpu_median = {v: statistics.median(cpu_times[v]) for v in VARIANTS}
    kept = {v: kept_tensor_bytes(*built[v]) for v in ("full", "delta")}
    del built

    rss = {}
    for v in ("full", "delta"):
        cmd = [sys.executable, os.path.abspath(__file__), "--rss-child", v, "--dtype", args.dtype,
               "--threads", str(args.threads), "--batch", str(args.batch), "--seq", str(args.seq),
               "--rank", str(args.rank), "--density", str(args.density)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rss[v] = json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_growth_mib"]

    def verdict(value, target):
        return f"{value:.3f}  (target <= {target}: {'met' if value <= target else 'NOT met'})"

    print(f"CPU, torch {torch.__version__}, {args.threads} threads (OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}), "
          f"{'bf16 autocast' if bf16 else 'fp32'}; "
          f"Llama-like model with {n_params / 1e6:.1f}M parameters ({n_target / 1e6:.1f}M in the target Linears); "
          f"batch {args.batch} x {args.seq} tokens; AdamW; {args.reps} interleaved steps per variant, medians; "
          f"{args.density:.0%} of entries (delta) / rows (lock_lora) locked; LoRA rank {args.rank}")
    print()
    print("variant      median step: wall (s)  CPU (s)   all steps, wall (s)")
    for v in VARIANTS:
        print(f"{v:<12} {median[v]:>19.3f} {cpu_median[v]:>8.3f}   {' '.join(f'{t:.2f}' for t in times[v])}")
    print()
    print("step time   delta / full fine-tuning        :", verdict(median["delta"] / median["full"], 1.15),
          f"  [CPU time: {cpu_median['delta'] / cpu_median['full']:.3f}]")
    print("step time   lock_lora (neuron) / PEFT LoRA  :", verdict(median["lock_lora"] / median["peft_lora"], 1.10),
          f"  [CPU time: {cpu_median['lock_lora'] / cpu_median['peft_lora']:.3f}]")
    print("memory      delta / full, kept tensor bytes :", verdict(kept["delta"] / kept["full"], 1.4),
          f"  [{kept['delta'] / 2**20:.0f} vs {kept['full'] / 2**20:.0f} MiB: params + buffers + grads + "
          "optimizer state + decoded locks]")
    print("memory      delta / full, peak RSS growth   :", verdict(rss["delta"] / rss["full"], 1.4),
          f"  [{rss['delta']:.0f} vs {rss['full']:.0f} MiB: fresh process, build + 2 steps, incl. activations]")


if __name__ == "__main__":
    main()
