"""``safety-peft rescore``: score a fine-tuned model again with the settings recorded in the masks."""

from __future__ import annotations

import argparse

from .common import save_masks_and_scores, add_model_args, fraction, positive_int


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "rescore",
        help="score a fine-tuned model with the settings recorded in masks/",
        description="Recompute the critical set of a fine-tuned model with the same method, data, p, q, group "
        "and granularity as an existing mask artifact (each can be overridden), for `safety-peft compare`.",
        epilog="example:\n  safety-peft rescore --model finetuned/ --masks masks/ --out masks_after/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(p, "the fine-tuned model (folder or Hub id); with --adapter, the base it was trained from")
    p.add_argument("--adapter", default=None,
                   help="a SafetyFreeze (or any PEFT) adapter folder applied on --model; its effective weights are scored")
    p.add_argument("--masks", required=True, help="the mask artifact (folder or Hub repo id) to repeat")
    p.add_argument("--out", required=True, help="folder for the new masks")
    p.add_argument("--data", default=None, help="override the recorded safety data")
    p.add_argument("--utility-data", default=None, help="override the recorded utility data")
    p.add_argument("--method", default=None, choices=["wanda", "snip", "magnitude", "random"],
                   help="override the scoring method")
    p.add_argument("--group", default=None, choices=["row", "layer", "global"], help="override the selection group")
    p.add_argument("--granularity", default=None, choices=["weight", "neuron"], help="override the granularity")
    p.add_argument("--sparsity", type=fraction, default=None, help="override p")
    p.add_argument("--utility-sparsity", type=fraction, default=None, help="override q")
    p.add_argument("--nsamples", type=positive_int, default=None, help="override the number of samples")
    p.add_argument("--batch-size", type=positive_int, default=None)
    p.add_argument("--save-scores", action="store_true", help="also write the raw scores (for Spearman in compare)")
    p.add_argument("--no-progress", action="store_true")
    return p


def run(args: argparse.Namespace) -> int:
    from ..default_model import load_model_and_tokenizer
    from ..masks import SafetyMasks
    from ..rescore import rescore

    before = SafetyMasks.from_pretrained(args.masks)
    model, tokenizer = load_model_and_tokenizer(args.model, dtype=args.dtype, revision=args.revision)
    if args.adapter:
        from peft import PeftModel

        import safety_peft.tuners  # noqa: F401  (registers the method)

        model = PeftModel.from_pretrained(model, args.adapter)
    overrides = {
        k: v for k, v in dict(
            method=args.method, group=args.group, granularity=args.granularity,
            sparsity=args.sparsity, utility_sparsity=args.utility_sparsity, nsamples=args.nsamples,
            batch_size=args.batch_size,
        ).items() if v is not None
    }
    after, safety_scores, utility_scores = rescore(
        model, tokenizer, before, data=args.data, utility_data=args.utility_data,
        progress=not args.no_progress, return_scores=True, **overrides,
    )
    save_masks_and_scores(args.out, after, safety_scores, utility_scores, args.save_scores)
    return 0
