"""Small datasets written by the safety-peft team and shipped in the package (see docs/builtin_data.md).

They make the demo and the tests self-contained (no download). The ``*_eval`` sets are held out: they are
never used for calibration or training, only to measure refusal, over-refusal and perplexity.
"""

from __future__ import annotations

from pathlib import Path

BUILTIN_DIR = Path(__file__).parent / "builtin_data"

BUILTIN_DATASETS: dict[str, str] = {
    "harmful_train": "harmful requests + short refusals (messages); safety calibration and refusal training",
    "benign_train": "varied benign instructions + helpful answers (messages); utility calibration, and "
    "keeps the model helpful during refusal training",
    "benign_train_self": "the benign_train prompts with the embedded model's own greedy answers (messages); "
    "the benign half of the aligned base's refusal training (self-distillation)",
    "finetune": "benign brand-voice task (answers open with 'Sure!', one or two sentences) (messages); "
    "the demo's fine-tuning step",
    "harmful_eval": "held-out harmful prompts (prompt, category); evaluation only",
    "benign_eval": "held-out benign prompts with reference answers (prompt, completion, category); "
    "evaluation only (over-refusal, perplexity)",
}
"""Name -> what it is for. The names are also accepted as ``builtin:<name>`` wherever prompts are loaded."""

HELD_OUT = ("harmful_eval", "benign_eval")


def builtin_path(name: str) -> Path:
    """Path of the jsonl file of a built-in dataset."""
    if name not in BUILTIN_DATASETS:
        raise KeyError(f"Unknown built-in dataset {name!r}; choose one of {sorted(BUILTIN_DATASETS)}.")
    return BUILTIN_DIR / f"{name}.jsonl"


def load_builtin(name: str):
    """Load a built-in dataset as a ``datasets.Dataset`` (rows as in the jsonl file)."""
    import json

    from datasets import Dataset

    with open(builtin_path(name), encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    return Dataset.from_list(rows)


__all__ = ["BUILTIN_DATASETS", "HELD_OUT", "builtin_path", "load_builtin"]
