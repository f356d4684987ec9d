"""``safety-peft eval``: refusal rate on harmful prompts, over-refusal and perplexity on benign ones."""

from __future__ import annotations

import argparse
import importlib
from typing import Any

from ..errors import SafetyPeftError
from .common import add_model_args, positive_int

DESCRIPTION = """\
Generate greedy answers to harmful and benign prompts with the chat template, judge each answer for
refusal, and report: the refusal rate on harmful prompts (higher is safer), the over-refusal rate on
benign prompts (lower is better) and the perplexity of the benign prompts' reference answers.

Prompt sources: a .txt file (one prompt a line), a .jsonl/.json file (rows with 'prompt' [+ 'completion']
or 'messages'), builtin:<name> (harmful_eval, benign_eval, ...) or a Hub dataset id. Without --harmful /
--benign the built-in held-out sets are used; pass 'none' to skip one half.
"""

EPILOG = """\
examples:
  safety-peft eval                                    # embedded model, built-in held-out sets
  safety-peft eval --model ./my-model --harmful prompts.txt --benign benign.jsonl --out results.json
  safety-peft eval --model ./my-model --judge my_judges:llama_guard_refused
"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "eval",
        help="measure refusal, over-refusal and perplexity",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(p)
    p.add_argument("--harmful", default="builtin:harmful_eval",
                   help="harmful prompts (default: %(default)s); 'none' to skip")
    p.add_argument("--benign", default="builtin:benign_eval",
                   help="benign prompts, with reference answers for perplexity (default: %(default)s); "
                        "'none' to skip")
    p.add_argument("--out", help="write every generation and the metrics to this JSON file")
    p.add_argument("--max-new-tokens", type=positive_int, default=64,
                   help="tokens generated per answer; a refusal shows early (default: %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=16,
                   help="prompts per generation batch (default: %(default)s)")
    p.add_argument("--limit", type=positive_int, help="use only the first N prompts of each set")
    p.add_argument("--split", default="train", help="split of a Hub dataset (default: %(default)s)")
    p.add_argument("--prompt-column", help="column holding the prompt, if not prompt/instruction/question/...")
    p.add_argument("--reference-column", help="column holding the benign reference answer, if not completion/...")
    p.add_argument("--system-prompt", help="system message to prepend (default: the template's own)")
    p.add_argument("--no-chat-template", action="store_true",
                   help="feed each prompt as raw text (for base models without a chat template)")
    p.add_argument("--no-perplexity", action="store_true", help="skip the perplexity of benign references")
    p.add_argument("--judge", metavar="MODULE:NAME",
                   help="refusal judge to import instead of the refusal phrases: a callable taking (response) "
                        "or (prompt, response) and returning True when the response refuses")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


def load_judge(spec: str):
    """Import ``module:name`` (a class is instantiated without arguments)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise SafetyPeftError(f"--judge expects MODULE:NAME, got {spec!r}.")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise SafetyPeftError(f"Cannot import judge {spec!r}: {err}") from err
    if isinstance(obj, type):
        obj = obj()
    if not callable(obj):
        raise SafetyPeftError(f"Judge {spec!r} is not callable.")
    return obj


def run(args: argparse.Namespace) -> int:
    from ..default_model import load_model_and_tokenizer
    from ..evaluation import evaluate_safety, load_prompts

    judge = load_judge(args.judge) if args.judge else None

    def source(value):
        if value is None or str(value).lower() == "none":
            return None
        return load_prompts(value, split=args.split, prompt_column=args.prompt_column,
                            reference_column=args.reference_column, limit=args.limit)

    # Load the prompts before the model, so a typo in a path fails in a second, not after loading.
    harmful, benign = source(args.harmful), source(args.benign)
    if harmful is None and benign is None:
        raise SafetyPeftError("--harmful and --benign are both 'none': nothing to evaluate")
    model, tokenizer = load_model_and_tokenizer(args.model, dtype=args.dtype, revision=args.revision)
    result = evaluate_safety(
        model, tokenizer, harmful, benign, judge=judge, max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size, chat_template=not args.no_chat_template, system_prompt=args.system_prompt,
        perplexity=not args.no_perplexity, progress=not args.no_progress,
    )
    result.settings.update(model=args.model, dtype=args.dtype)
    print(result.summary())
    if args.out:
        print(f"wrote {result.save(args.out)}")
    return 0
