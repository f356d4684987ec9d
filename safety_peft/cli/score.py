"""``safety-peft score``: find the safety-critical weights of a model and save them as a mask artifact."""

from __future__ import annotations

import argparse

from .common import save_masks_and_scores, add_model_args, add_scoring_args, fraction

EXAMPLE = """example:
  safety-peft score --model PATH_OR_ID --data safety.jsonl --utility-data utility.jsonl \\
      --method wanda --sparsity 0.03 --utility-sparsity 0.03 --group layer --out masks/

Data rows may be `messages` chats, `prompt`/`completion` pairs, `text`, or pre-tokenized `input_ids` +
`completion_mask`; files are json/jsonl/parquet/csv, or a Hub dataset id, or builtin:NAME.
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "score",
        help="score weights on safety data (minus utility) and save the critical set",
        description="Score every target weight on a safety calibration set (harmful requests with refusals) "
        "and keep the top fraction; with --utility-data, remove the weights that are also top for utility "
        "(set difference, Wei et al. 2024).",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(p)
    p.add_argument("--data", default="builtin:harmful_train",
                   help="safety calibration data (default: the built-in harmful requests with refusals)")
    p.add_argument("--utility-data", default=None,
                   help="utility calibration data to subtract (e.g. builtin:benign_train); default: none")
    p.add_argument("--split", default="train", help="split of a Hub dataset (default train)")
    sel = p.add_argument_group("selection")
    sel.add_argument("--sparsity", type=fraction, default=0.03, help="p: fraction kept as safety-critical (default 0.03)")
    sel.add_argument("--utility-sparsity", type=fraction, default=None,
                     help="q: fraction of utility-critical weights removed (default: same as --sparsity)")
    sel.add_argument("--group", default="layer", choices=["row", "layer", "global"],
                     help="where entries compete: each output row, each weight matrix (default), or all together")
    sel.add_argument("--granularity", default="weight", choices=["weight", "neuron"],
                     help="lock single entries (default) or whole output rows")
    add_scoring_args(p)
    p.add_argument("--out", required=True, help="folder for safety_masks.safetensors and its model card")
    p.add_argument("--save-scores", action="store_true", help="also write the raw float32 scores next to the masks")
    return p


def run(args: argparse.Namespace) -> int:
    from ..critical import find_safety_critical
    from ..default_model import load_model_and_tokenizer
    from ..errors import SelectionError

    if args.utility_sparsity is not None and args.utility_data is None:
        raise SelectionError("--utility-sparsity needs --utility-data (the set to subtract)")
    model, tokenizer = load_model_and_tokenizer(args.model, dtype=args.dtype, revision=args.revision)
    masks, safety_scores, utility_scores = find_safety_critical(
        model, tokenizer, args.data, utility_data=args.utility_data, method=args.method,
        sparsity=args.sparsity, utility_sparsity=args.utility_sparsity, group=args.group,
        granularity=args.granularity, nsamples=args.nsamples, max_length=args.max_length,
        batch_size=args.batch_size, target_modules=args.target_modules, seed=args.seed,
        snip_variant=args.snip_variant, progress=not args.no_progress, return_scores=True,
    )
    save_masks_and_scores(args.out, masks, safety_scores, utility_scores, args.save_scores)
    return 0
