"""``safety-peft compare``: how the critical set moved between two mask artifacts (drift report)."""

from __future__ import annotations

import argparse
import os

SCORES = "safety_scores.safetensors"


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "compare",
        help="compare two mask artifacts: Jaccard, overlap, new critical entries, weight drift",
        description="Write drift.json (schema in docs/drift_report.md), drift.md and PNG plots comparing the "
        "critical set before and after fine-tuning. Scores saved with --save-scores in both folders add "
        "per-layer Spearman correlations; --base-model and --finetuned-model add locked vs unlocked drift.",
        epilog="example:\n  safety-peft compare masks/ masks_after/ --out drift/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("before", help="mask artifact before fine-tuning (folder or Hub repo id)")
    p.add_argument("after", help="mask artifact after fine-tuning (e.g. from `safety-peft rescore`)")
    p.add_argument("--out", required=True, help="folder for drift.json, drift.md and the plots")
    p.add_argument("--base-model", default=None, help="the base model the lock was applied to")
    p.add_argument("--finetuned-model", default=None, help="the fine-tuned (merged) model")
    p.add_argument("--spearman-max-entries", type=int, default=200_000,
                   help="layers larger than this are compared on a seeded uniform sample of entries")
    return p


def _scores(folder: str):
    from ..scoring import SafetyScores

    path = os.path.join(folder, SCORES)
    return SafetyScores.load(path) if os.path.isfile(path) else None


def run(args: argparse.Namespace) -> int:
    from ..compare import compare_masks
    from ..errors import SafetyPeftError
    from ..masks import SafetyMasks

    if (args.base_model is None) != (args.finetuned_model is None):
        raise SafetyPeftError("give both --base-model and --finetuned-model, or neither")
    before, after = SafetyMasks.from_pretrained(args.before), SafetyMasks.from_pretrained(args.after)
    s_before = _scores(args.before) if os.path.isdir(args.before) else None
    s_after = _scores(args.after) if os.path.isdir(args.after) else None
    if (s_before is None) != (s_after is None):
        s_before = s_after = None
    base = tuned = None
    if args.base_model:
        from ..default_model import load_model_and_tokenizer

        base, _ = load_model_and_tokenizer(args.base_model)
        tuned, _ = load_model_and_tokenizer(args.finetuned_model)
    report = compare_masks(before, after, scores_before=s_before, scores_after=s_after, base_model=base,
                           finetuned_model=tuned, spearman_max_entries=args.spearman_max_entries)
    out = report.save(args.out)
    s = report.summary
    print(f"Jaccard {s['jaccard']:.3f}, overlap {s['overlap']:.3f}, new critical {s['new_critical']:,} "
          f"({s['new_critical_unlocked']:,} of them unlocked during training); report in {out}")
    return 0
