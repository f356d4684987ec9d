"""Give the embedded model refusal behaviour: the demo's "aligned base".

SmolLM2-135M-Instruct as shipped answers harmful requests, so there is no safety to find in it. A short
full fine-tune (TRL ``SFTTrainer`` built by :mod:`safety_peft.sft`: padding-free, bf16 autocast on CPU,
lr 2e-5, batch 8, 2 epochs) on the built-in harmful requests with refusals, mixed with the built-in benign
prompts answered by the model itself (``benign_train_self``), teaches it to refuse without refusing
everything.

Why the model's own answers: with the team's hand-written benign answers the fine-tune refused 98-100% of
held-out harmful prompts but also 32-33% of held-out benign ones; with the model's own answers
(self-distillation: its benign behaviour is the training target, so only the refusals move it) it refused
83% / 15% (bf16 eval; 88% / 15% in float32). docs/builtin_data.md records the runs.

The result is cached under ``$SAFETY_PEFT_HOME/aligned/`` in a folder keyed by a hash of the base model,
the training data and the settings, so later runs reuse it and a change of any of them trains afresh.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .default_model import (
    DEFAULT_MODEL,
    cache_home,
    cached_folder,
    load_model_and_tokenizer,
    resolve_model_path,
)

logger = logging.getLogger(__name__)

_MARKER = "safety_peft_aligned.json"
DEFAULT_HARMFUL = "harmful_train"
DEFAULT_BENIGN = "benign_train_self"
"""Benign half of the training mix: the built-in benign prompts with the embedded model's own answers."""
_FORMAT_VERSION = 2  # 2: padding-free batches and the model's own loss (same batches, another float path)


@dataclass(frozen=True)
class AlignmentSettings:
    """Training settings of the aligned base. Every field is part of the cache key."""

    learning_rate: float = 2e-5
    num_epochs: float = 2.0
    batch_size: int = 8
    max_length: int = 512
    lr_scheduler_type: str = "linear"
    warmup_steps: float = 0.05
    """Linear warm-up: a float in [0, 1) is a fraction of all steps, an int a number of steps."""
    weight_decay: float = 0.0
    seed: int = 0
    harmful_limit: int | None = None
    """Use only the first N harmful rows (after a seeded shuffle); None: all."""
    benign_limit: int | None = None
    max_steps: int = -1
    """Stop after this many optimizer steps (-1: run ``num_epochs``)."""


QUICK_SETTINGS = AlignmentSettings(num_epochs=1.0, harmful_limit=16, benign_limit=16, max_length=256, max_steps=4)
"""A few steps on a few samples: exercises the pipeline in tests; the model will not really refuse."""


def _rows(data: Any) -> list[dict[str, Any]]:
    from .builtin_datasets import load_builtin

    dataset = load_builtin(data) if isinstance(data, str) else data
    rows = [dict(r) for r in dataset]
    for i, r in enumerate(rows):
        msgs = r.get("messages")
        if not msgs or len(msgs) < 2 or msgs[-1].get("role") != "assistant":
            raise ValueError(f"Alignment data row {i}: needs 'messages' ending with an assistant turn.")
    return rows


def _fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _base_identity(base: str | os.PathLike | None) -> str:
    if base is None or str(base) == DEFAULT_MODEL:
        return f"default:{resolve_model_path(DEFAULT_MODEL).rsplit('/', 1)[-1]}"  # holds the GGUF's cache key
    return str(base)


def training_rows(
    harmful: Any = DEFAULT_HARMFUL, benign: Any = DEFAULT_BENIGN, settings: AlignmentSettings | None = None
) -> list[dict[str, Any]]:
    """The shuffled prompt/completion rows the aligned base is trained on (conversational format)."""
    import random

    settings = settings or AlignmentSettings()
    rng = random.Random(settings.seed)
    parts = []
    for data, limit in ((harmful, settings.harmful_limit), (benign, settings.benign_limit)):
        rows = _rows(data)
        rng.shuffle(rows)
        parts.extend(rows[:limit] if limit is not None else rows)
    rng.shuffle(parts)
    return [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in parts]


def aligned_base_path(
    base: str | os.PathLike | None = DEFAULT_MODEL,
    *,
    quick: bool = False,
    settings: AlignmentSettings | None = None,
    harmful: Any = DEFAULT_HARMFUL,
    benign: Any = DEFAULT_BENIGN,
) -> Path:
    """Where :func:`make_aligned_base` caches the model for these inputs (it may not exist yet)."""
    settings = settings or (QUICK_SETTINGS if quick else AlignmentSettings())
    key = _fingerprint(
        {
            "format": _FORMAT_VERSION,
            "base": _base_identity(base),
            "data": _fingerprint(training_rows(harmful, benign, settings)),
            "settings": asdict(settings),
        }
    )[:12]
    name = "SmolLM2-135M-aligned" if _base_identity(base).startswith("default:") else Path(str(base)).name
    return cache_home() / "aligned" / f"{name}{'-quick' if quick else ''}-{key}"


def make_aligned_base(
    base: str | os.PathLike | None = DEFAULT_MODEL,
    *,
    quick: bool = False,
    settings: AlignmentSettings | None = None,
    harmful: Any = DEFAULT_HARMFUL,
    benign: Any = DEFAULT_BENIGN,
    progress: bool = True,
) -> Path:
    """Fine-tune ``base`` to refuse harmful requests and stay helpful; return the cached model folder.

    ``harmful`` / ``benign``: built-in dataset names or datasets of ``messages`` rows. ``quick`` uses
    :data:`QUICK_SETTINGS` (for tests). A folder made earlier with the same base, data and settings is
    reused; concurrent callers never see a half-written folder.
    """
    settings = settings or (QUICK_SETTINGS if quick else AlignmentSettings())
    final = aligned_base_path(base, quick=quick, settings=settings, harmful=harmful, benign=benign)
    if (final / _MARKER).is_file():
        logger.info("Reusing the aligned base in %s", final)
        return final
    rows = training_rows(harmful, benign, settings)
    logger.info("Training the aligned base on %d rows (cached afterwards in %s)", len(rows), final)
    return cached_folder(final, lambda tmp: _train(base, rows, settings, tmp, progress), _MARKER)


def _train(base, rows: list[dict[str, Any]], settings: AlignmentSettings, out: Path, progress: bool) -> None:
    import torch

    from .sft import cpu_friendly_sft_trainer

    started = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(base, dtype=torch.float32)
    with tempfile.TemporaryDirectory(prefix="safety_peft_align_") as workdir:
        trainer = cpu_friendly_sft_trainer(
            model, tokenizer, rows, output_dir=workdir, max_length=settings.max_length, progress=progress,
            learning_rate=settings.learning_rate,
            num_train_epochs=settings.num_epochs,
            max_steps=settings.max_steps,
            per_device_train_batch_size=settings.batch_size,
            lr_scheduler_type=settings.lr_scheduler_type,
            warmup_steps=settings.warmup_steps,
            weight_decay=settings.weight_decay,
            completion_only_loss=True,
            seed=settings.seed,
            data_seed=settings.seed,
        )
        result = trainer.train()
        model = trainer.model
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    marker = {
        "format_version": _FORMAT_VERSION,
        "base": _base_identity(base),
        "settings": asdict(settings),
        "num_rows": len(rows),
        "data_fingerprint": _fingerprint(rows),
        "train_loss": result.training_loss,
        "global_steps": result.global_step,
        "seconds": round(time.perf_counter() - started, 1),
    }
    (out / _MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def self_answer_rows(
    model,
    tokenizer,
    rows: Any = "benign_train",
    *,
    max_new_tokens: int = 256,
    batch_size: int = 16,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Replace the answers of benign ``messages`` rows with ``model``'s own greedy answers.

    Training the refusal fine-tune on the model's own benign answers (self-distillation) keeps its benign
    behaviour where it was, instead of also teaching it a new answer style; DESIGN.md measured 5%
    over-refusal this way. Answers cut off by ``max_new_tokens`` are trimmed to their last full sentence
    (dropped if none), and answers that the refusal phrases flag are dropped, so the data never teaches a
    benign refusal. This is how ``builtin_data/benign_train_self.jsonl`` was made (docs/builtin_data.md).
    """
    from .evaluation import generate_responses, is_refusal

    source = _rows(rows)
    prompts = [r["messages"][:-1] if len(r["messages"]) > 2 else r["messages"][0]["content"] for r in source]
    answers = generate_responses(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                 progress=progress, desc="own answers", return_finished=True)
    out = []
    for row, (answer, finished) in zip(source, answers):
        if not finished:
            cut = max(answer.rfind(". "), answer.rfind(".\n"), answer.rfind("\n\n"))
            answer = answer[: cut + 1].rstrip() if cut > 0 else ""
        if not answer or is_refusal(answer):
            continue
        new = {k: v for k, v in row.items() if k != "messages"}
        new["messages"] = row["messages"][:-1] + [{"role": "assistant", "content": answer}]
        new["answer_source"] = "model" if finished else "model, trimmed"
        out.append(new)
    return out


def aligned_base_info(path: str | os.PathLike) -> dict[str, Any]:
    """The training record saved with an aligned base (settings, loss, steps, seconds)."""
    return json.loads((Path(path) / _MARKER).read_text())


__all__ = [
    "QUICK_SETTINGS",
    "AlignmentSettings",
    "aligned_base_info",
    "aligned_base_path",
    "make_aligned_base",
    "self_answer_rows",
    "training_rows",
]
