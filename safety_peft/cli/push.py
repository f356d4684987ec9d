"""``safety-peft push``: upload a mask artifact (or a drift report folder) to the Hugging Face Hub."""

from __future__ import annotations

import argparse
import os


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "push",
        help="push a mask artifact or a drift report to the Hub",
        description="Upload a mask folder (checked first: a damaged artifact is refused) with a fresh model "
        "card, or a drift report folder (drift.json, drift.md, plots), with huggingface_hub. The local folder "
        "is never changed. Set HF_ENDPOINT to use another Hub server; HF_TOKEN or `hf auth login` for auth.",
        epilog="example:\n  safety-peft push masks/ my-org/llama-2-7b-chat-safety-masks",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("folder", help="a mask artifact folder or a drift report folder")
    p.add_argument("repo_id", help="the Hub repo, e.g. my-org/my-model-safety-masks")
    p.add_argument("--private", action="store_true", help="create the repo as private")
    p.add_argument("--revision", default=None, help="branch to push to (created if missing)")
    p.add_argument("--commit-message", default=None)
    p.add_argument("--token", default=None, help="Hub token (default: the logged-in one)")
    return p


def run(args: argparse.Namespace) -> int:
    from ..compare import DriftReport
    from ..masks import SafetyMasks

    push = dict(private=args.private or None, revision=args.revision, commit_message=args.commit_message,
                token=args.token)
    if os.path.isfile(os.path.join(args.folder, "drift.json")):
        url = DriftReport.load(args.folder).push_to_hub(args.repo_id, **push)
    else:
        url = SafetyMasks.from_pretrained(args.folder).push_to_hub(args.repo_id, **push)
    print(f"pushed {args.folder} to {args.repo_id}: {url}")
    return 0
