"""``safety-peft demo``: the whole story on the embedded model, written to a report folder."""

from __future__ import annotations

import argparse

from .common import fraction


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "demo",
        help="align, score, ablate, lock, rescore and report on the embedded SmolLM2-135M-Instruct",
        description="Run the whole workflow on the embedded model and write report.md, report.json and plots. "
        "The first run converts the model and trains its refusal behaviour (cached in $SAFETY_PEFT_HOME, "
        "default ~/.cache/safety_peft); later runs reuse both.",
        epilog="example:\n  safety-peft demo --out demo_report/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="demo_report", help="report folder (default demo_report/)")
    p.add_argument("--quick", action="store_true", help="tiny data and a few steps: checks the pipeline in minutes")
    p.add_argument("--method", default="wanda", choices=["wanda", "snip"])
    p.add_argument("--sparsity", type=fraction, default=None, help="p (default 0.05)")
    p.add_argument("--utility-sparsity", type=fraction, default=None, help="q (default 0.05)")
    p.add_argument("--group", default="layer", choices=["row", "layer", "global"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="hide progress bars (step lines stay)")
    return p


def run(args: argparse.Namespace) -> int:
    from ..demo import DemoSettings, run_demo

    overrides = {k: v for k, v in dict(method=args.method, sparsity=args.sparsity,
                                       utility_sparsity=args.utility_sparsity, group=args.group,
                                       seed=args.seed).items() if v is not None}
    settings = DemoSettings.quick_settings(**overrides) if args.quick else DemoSettings(**overrides)
    report = run_demo(args.out, settings, progress=not args.no_progress)
    print("\n".join(["", *report["findings"], "", f"report: {args.out}/report.md"]))
    return 0
