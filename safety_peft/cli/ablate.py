"""``safety-peft ablate``: zero the critical entries (or a random control set) and save the model."""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import SafetyPeftError
from .common import add_model_args

DESCRIPTION = """\
Zero the entries that a mask artifact marks critical and save the resulting model, to test whether the
mask carries safety: evaluate the result with `safety-peft eval`. With --random-control, zero instead the
same number of uniformly random entries in the same matrices (whole random rows for neuron masks), the
control the paper compares against. The masks are checked against the model first (names, shapes and the
fingerprint of the base weights).
"""

EPILOG = """\
examples:
  safety-peft ablate --masks masks/ --out ablated/
  safety-peft ablate --model ./aligned --masks masks/ --out ablated-random/ --random-control --seed 1
  safety-peft eval --model ablated/
"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "ablate",
        help="zero the critical weights (or a random control set) and save the model",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(p, "model the masks were made for: folder or Hub id; 'default' is the embedded model")
    p.add_argument("--masks", required=True, help="mask artifact: a folder or a Hub repo id")
    p.add_argument("--out", required=True, help="folder to write the ablated model to")
    p.add_argument("--random-control", action="store_true",
                   help="zero as many random entries per matrix instead of the critical ones")
    p.add_argument("--seed", type=int, default=0, help="seed of the random control (default: %(default)s)")
    p.add_argument("--masks-revision", help="revision of a Hub mask repo")
    p.add_argument("--no-check-fingerprint", action="store_true",
                   help="apply masks even if the model's weights differ from those they were made for")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return p


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..ablation import ablate, save_ablated
    from ..default_model import load_model_and_tokenizer
    from ..masks import SafetyMasks

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise SafetyPeftError(f"{out} exists and is not empty; pass --overwrite or choose another --out")
    model, tokenizer = load_model_and_tokenizer(args.model, dtype=args.dtype, revision=args.revision)
    masks = SafetyMasks.from_pretrained(args.masks, model=model, revision=args.masks_revision,
                                        check_fingerprint=not args.no_check_fingerprint)
    result = ablate(model, masks, random_control=args.random_control, seed=args.seed)
    save_ablated(model, tokenizer, out, result, overwrite=args.overwrite)
    kind = f"random control, seed {args.seed}" if args.random_control else "critical entries"
    print(f"zeroed {result.num_zeroed:,} of {result.num_entries:,} entries ({kind}) in {len(result.zeroed)} "
          f"weight matrices; wrote {out}")
    return 0
