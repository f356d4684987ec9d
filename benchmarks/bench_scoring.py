"""Scoring cost relative to the plain passes it is built from, measured side by side in one run.

Prints three ratios (targets from the scoring issue):
  wanda / plain no-grad forward            <= 1.2
  snip  / plain forward + backward         <= 2.0
  selection / wanda (layer and global)     <= 0.2

Each round times every contender once on the same batches, in rotating order; the ratios are medians of
per-round ratios, so drift in machine speed cancels. Run: python benchmarks/bench_scoring.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

# Sleeping (not spinning) OpenMP waits: on a shared 2-core machine spinning threads of other processes
# turn every small parallel op into a stall. Must be set before torch starts its thread pool.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from safety_peft.data import iter_batches, load_calibration_data  # noqa: E402
from safety_peft.scoring import score_model  # noqa: E402
from safety_peft.selection import select_critical  # noqa: E402


def build_model(args) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
        num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4,
        max_position_embeddings=args.seq_len * 2, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).eval()


def synthetic_data(args):
    """Pre-tokenized rows of varied length: a prompt then a completion (about half the tokens)."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(args.samples):
        n = int(args.seq_len * (0.6 + 0.4 * (i % 5) / 4))
        ids = torch.randint(3, args.vocab, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "completion_mask": [0] * (n // 2) + [1] * (n - n // 2)})
    return load_calibration_data(rows, max_length=args.seq_len)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sparsity", type=float, default=0.03)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    model = build_model(args)
    n_params = sum(p.numel() for p in model.parameters())
    calib = synthetic_data(args)
    batches = list(iter_batches(calib.samples, args.batch_size, pad_token_id=0))
    print(f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}; model: Llama, {n_params / 1e6:.1f}M parameters, {args.layers} layers, hidden {args.hidden}; "
          f"{len(calib)} samples x <= {args.seq_len} tokens, batch {args.batch_size}, {args.threads} threads")

    def plain_forward():
        with torch.no_grad():
            for b in batches:
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)

    def plain_forward_backward():
        for b in batches:
            labels = b["input_ids"].masked_fill(~b["completion_mask"], -100)
            out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=labels, use_cache=False)
            out.loss.backward()
        model.zero_grad(set_to_none=True)

    results = {}

    def wanda():
        results["wanda"] = score_model(model, None, calib, "wanda", batch_size=args.batch_size, progress=False)

    def snip():
        score_model(model, None, calib, "snip", batch_size=args.batch_size, progress=False)

    contenders = {"forward": plain_forward, "wanda": wanda, "forward+backward": plain_forward_backward, "snip": snip}
    wanda()  # warm-up (also fills results for the selection timing)
    plain_forward()
    times = {k: [] for k in contenders}
    sel_layer, sel_global = [], []
    for r in range(args.rounds):
        names = list(contenders)
        names = names[r % len(names):] + names[: r % len(names)]
        for name in names:
            times[name].append(timed(contenders[name]))
        scores = results["wanda"]
        sel_layer.append(timed(lambda: select_critical(scores, args.sparsity, utility_scores=scores,
                                                       utility_sparsity=args.sparsity, group="layer")))
        sel_global.append(timed(lambda: select_critical(scores, args.sparsity, utility_scores=scores,
                                                        utility_sparsity=args.sparsity, group="global")))

    def ratio(a, b):
        return statistics.median(x / y for x, y in zip(a, b))

    med = {k: statistics.median(v) for k, v in times.items()}
    print("median seconds: " + ", ".join(f"{k} {v:.3f}" for k, v in med.items())
          + f", selection(layer) {statistics.median(sel_layer):.3f}, selection(global) {statistics.median(sel_global):.3f}")
    rows = [
        ("wanda / plain no-grad forward", ratio(times["wanda"], times["forward"]), 1.2),
        ("snip / plain forward+backward", ratio(times["snip"], times["forward+backward"]), 2.0),
        ("selection(layer, set difference) / wanda", ratio(sel_layer, times["wanda"]), 0.2),
        ("selection(global, set difference) / wanda", ratio(sel_global, times["wanda"]), 0.2),
    ]
    for label, value, target in rows:
        print(f"{label:<45} {value:6.3f}   (target <= {target})  {'OK' if value <= target else 'MISSED'}")


if __name__ == "__main__":
    main()
