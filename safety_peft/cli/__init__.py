"""The ``safety-peft`` command: thin subcommands over the Python API (no logic lives only here)."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from ..errors import SafetyPeftError

# Subcommand modules, each with `add_parser(subparsers)` and `run(args) -> int`.
SUBCOMMANDS = ("score", "rescore", "compare", "push", "eval", "ablate", "demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="safety-peft",
        description=(
            "Find the weights that carry an aligned model's safety (Wanda/SNIP scores on harmful requests "
            "with refusals, minus the weights critical for utility), lock them while fine-tuning, and see "
            "how the critical set moves."
        ),
        epilog="Run `safety-peft demo` for the whole story on the embedded SmolLM2-135M-Instruct.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"{__name__}.{name}":
                continue  # subcommand not shipped in this build
            raise
        module.add_parser(subparsers)
        subparsers.choices[name].set_defaults(run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except SafetyPeftError as exc:
        print(f"safety-peft {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
