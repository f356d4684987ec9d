"""Argument types and options shared by several subcommands."""

from __future__ import annotations

import argparse
import math


def fraction(text: str) -> float:
    """A float in [0, 1], checked before any model is loaded."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}") from None
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (a fraction, e.g. 0.03 for 3%), got {text}")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def target_modules(text: str) -> str | list[str]:
    """``q_proj,v_proj`` becomes a list of names; anything with regex characters stays a regex."""
    if any(c in text for c in "*+?[]()|^$\\"):
        return text
    return [t.strip() for t in text.split(",") if t.strip()]


def save_masks_and_scores(out: str, masks, safety_scores, utility_scores, save_scores: bool) -> None:
    """Write the mask artifact, and with ``--save-scores`` the raw scores beside it; say where."""
    import os

    masks.save_pretrained(out)
    if save_scores:
        safety_scores.save(os.path.join(out, "safety_scores.safetensors"))
        if utility_scores is not None:
            utility_scores.save(os.path.join(out, "utility_scores.safetensors"))
    print(f"{masks!r}\nsaved to {out}")


def add_model_args(parser: argparse.ArgumentParser, help_text: str | None = None) -> None:
    parser.add_argument(
        "--model", default="default",
        help=help_text or "model folder or Hub id; 'default' (the default) is the embedded SmolLM2-135M-Instruct",
    )
    parser.add_argument("--revision", default=None, help="Hub revision of --model")
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
        help="dtype to load the model in (default float32; scoring accumulates in float32 whatever the dtype)",
    )


def add_scoring_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("scoring")
    g.add_argument("--method", default="wanda", choices=["wanda", "snip", "magnitude", "random"],
                   help="wanda: |W|*||X|| (forward only); snip: |W * dL/dW| per sample (forward+backward)")
    g.add_argument("--nsamples", type=positive_int, default=128, help="calibration samples drawn (seeded)")
    g.add_argument("--max-length", type=positive_int, default=512, help="tokens per sample; longer ones are truncated")
    g.add_argument("--batch-size", type=positive_int, default=4)
    g.add_argument("--target-modules", type=target_modules, default=None,
                   help="comma-separated module names (q_proj,v_proj) or a regex; default: every Linear in the "
                        "decoder blocks")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--snip-variant", default="per_sample", choices=["per_sample", "sum"],
                   help="per_sample: sum_i |grad_i| (default, as the paper); sum: |sum_i grad_i|")
    g.add_argument("--no-progress", action="store_true", help="hide progress bars")
