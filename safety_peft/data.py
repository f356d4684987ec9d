"""Calibration data: rows in the four formats of the design notes become token ids with a completion mask.

Row formats (the first that matches wins):

* ``messages``: a chat; the chat template is applied and the last assistant turn is the completion.
* ``prompt`` / ``completion``: strings, or lists of chat messages (TRL's conversational form).
  Strings are wrapped as one user turn and one assistant turn when the tokenizer has a chat template
  (``chat_template="auto"``, the default, because safety behaviour lives in the chat format of an
  aligned model); with ``chat_template=False`` or a tokenizer without a template they are concatenated as
  plain text, as TRL's "standard" format does.
* ``text``: plain text; every token counts as completion.
* ``input_ids`` + ``completion_mask``: pre-tokenized, used exactly as given.

Only completion tokens are scored. Samples are truncated to ``max_length`` (the count is reported) and a
sample whose completion is cut away entirely is dropped, since its loss is undefined.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Literal, Sequence, Union

import torch

from .errors import CalibrationDataError

CalibrationSource = Union[str, os.PathLike, "datasets.Dataset", Sequence[dict]]  # noqa: F821

_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass
class CalibrationSample:
    """One tokenized sample: ``completion_mask`` is True on the tokens whose prediction counts."""

    input_ids: torch.Tensor
    completion_mask: torch.Tensor

    def __len__(self) -> int:
        return int(self.input_ids.numel())


@dataclass
class CalibrationData:
    """Tokenized samples plus what is needed to reproduce or recognise them later."""

    samples: list[CalibrationSample]
    source: str
    fingerprint: str
    num_truncated: int = 0
    num_dropped: int = 0
    settings: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def num_completion_tokens(self) -> int:
        return int(sum(int(s.completion_mask.sum()) for s in self.samples))

    def describe(self) -> dict[str, Any]:
        """JSON-serializable summary recorded in the provenance of scores and masks."""
        return {
            "source": self.source,
            "fingerprint": self.fingerprint,
            "num_samples": len(self.samples),
            "num_truncated": self.num_truncated,
            "num_dropped": self.num_dropped,
            **self.settings,
        }

    def shard(self, rank: int, world_size: int) -> list[CalibrationSample]:
        """This process's share of the samples (round robin, so shares differ by at most one)."""
        return self.samples[rank::world_size]


def _describe_source(source: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        # Local files are recorded by absolute path, so rescoring finds them from any working directory.
        return os.path.abspath(path) if os.path.isfile(path) else path
    return f"<in-memory {type(source).__name__}>"


def _load_rows(source: Any, split: str) -> list[dict]:
    """Rows as plain dicts from a file, a Hub dataset id, a ``datasets.Dataset`` or a list of dicts."""
    import datasets

    if isinstance(source, datasets.DatasetDict):
        if split not in source:
            raise CalibrationDataError(f"Dataset has no split {split!r}; it has {sorted(source)}.")
        source = source[split]
    if isinstance(source, datasets.Dataset):
        return [dict(row) for row in source]
    if isinstance(source, (list, tuple)):
        if source and not all(isinstance(r, dict) for r in source):
            raise CalibrationDataError("A list of calibration rows must hold dicts.")
        return [dict(r) for r in source]
    if not isinstance(source, (str, os.PathLike)):
        raise CalibrationDataError(
            f"Cannot read calibration data from {type(source).__name__}: pass a file path, a Hub dataset id, "
            "a datasets.Dataset or a list of dict rows."
        )
    path = os.fspath(source)
    if path.startswith("builtin:"):
        from .builtin_datasets import load_builtin

        try:
            return [dict(row) for row in load_builtin(path.split(":", 1)[1])]
        except KeyError as err:  # load_builtin names the valid datasets
            raise CalibrationDataError(err.args[0]) from None
    ext = os.path.splitext(path)[1].lower()
    if os.path.isfile(path):
        if ext not in _FILE_BUILDERS:
            raise CalibrationDataError(
                f"{path}: unsupported file type {ext!r}; use one of {sorted(_FILE_BUILDERS)}."
            )
        if ext in (".json", ".jsonl"):
            return _read_json_rows(path)
        try:
            ds = datasets.load_dataset(_FILE_BUILDERS[ext], data_files=path, split="train")
        except Exception as exc:  # noqa: BLE001 - datasets raises many kinds; the message is what matters
            raise CalibrationDataError(f"{path}: could not be read as {ext[1:]}: {exc}") from exc
        return [dict(row) for row in ds]
    if os.path.exists(path) or ext in _FILE_BUILDERS:
        raise CalibrationDataError(f"{path}: no such file.")
    try:
        ds = datasets.load_dataset(path, split=split)
    except Exception as exc:  # noqa: BLE001
        raise CalibrationDataError(f"Could not load the Hub dataset {path!r} (split {split!r}): {exc}") from exc
    return [dict(row) for row in ds]


def _read_json_rows(path: str) -> list[dict]:
    """JSON lines or a JSON array; errors name the line so a user can fix the file."""
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CalibrationDataError(f"{path}: invalid JSON: {exc}") from exc
    else:
        rows = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise CalibrationDataError(f"{path}, line {lineno}: invalid JSON: {exc.msg}") from exc
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise CalibrationDataError(f"{path}: row {i} is a {type(row).__name__}, expected an object.")
    return rows


def _require_template(tokenizer: Any, what: str) -> None:
    if getattr(tokenizer, "chat_template", None) is None:
        raise CalibrationDataError(
            f"{what} need a chat template, but the tokenizer has none. Set `tokenizer.chat_template`, "
            "or give plain `text` / `prompt`+`completion` strings with chat_template=False."
        )


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _chat_to_ids(tokenizer: Any, prompt_messages: list[dict], completion_messages: list[dict]) -> tuple[list, list]:
    """Prompt ids (with the generation prompt) and completion ids of a chat, split at the template level."""
    prompt_text = tokenizer.apply_chat_template(prompt_messages, tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(prompt_messages + completion_messages, tokenize=False)
    if full_text.startswith(prompt_text):
        return _encode(tokenizer, prompt_text), _encode(tokenizer, full_text[len(prompt_text):])
    # Templates that rewrite earlier turns: tokenize both and split at the longest common prefix.
    prompt_ids, full_ids = _encode(tokenizer, prompt_text), _encode(tokenizer, full_text)
    common = 0
    for a, b in zip(prompt_ids, full_ids):
        if a != b:
            break
        common += 1
    return full_ids[:common], full_ids[common:]


def _check_messages(messages: Any, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise CalibrationDataError(f"{where}: `messages` must be a non-empty list of {{role, content}} dicts.")
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise CalibrationDataError(f"{where}: every message needs a 'role' and a 'content'; got {m!r}.")
    return messages


def _row_to_ids(row: dict, tokenizer: Any, chat_template: bool | Literal["auto"], where: str) -> tuple[list, list]:
    """(prompt ids, completion ids) for one row; for pre-tokenized rows the mask is returned instead."""
    if "messages" in row and row["messages"] is not None:
        messages = _check_messages(row["messages"], where)
        last_assistant = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last_assistant is None:
            raise CalibrationDataError(f"{where}: `messages` has no assistant turn to use as the completion.")
        _require_template(tokenizer, f"{where}: `messages` rows")
        return _chat_to_ids(tokenizer, messages[:last_assistant], messages[last_assistant:last_assistant + 1])
    if "prompt" in row and "completion" in row:
        prompt, completion = row["prompt"], row["completion"]
        if isinstance(prompt, list) or isinstance(completion, list):
            if not (isinstance(prompt, list) and isinstance(completion, list)):
                raise CalibrationDataError(f"{where}: `prompt` and `completion` must both be strings or both lists.")
            _require_template(tokenizer, f"{where}: conversational prompt/completion rows")
            return _chat_to_ids(tokenizer, _check_messages(prompt, where), _check_messages(completion, where))
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise CalibrationDataError(f"{where}: `prompt` and `completion` must be strings or message lists.")
        has_template = getattr(tokenizer, "chat_template", None) is not None
        if chat_template is True or (chat_template == "auto" and has_template):
            _require_template(tokenizer, f"{where}: prompt/completion rows with chat_template=True")
            return _chat_to_ids(
                tokenizer, [{"role": "user", "content": prompt}], [{"role": "assistant", "content": completion}]
            )
        completion_ids = _encode(tokenizer, completion)
        if tokenizer.eos_token_id is not None:
            completion_ids.append(tokenizer.eos_token_id)
        return _encode(tokenizer, prompt), completion_ids
    if "text" in row:
        if not isinstance(row["text"], str):
            raise CalibrationDataError(f"{where}: `text` must be a string.")
        return [], _encode(tokenizer, row["text"])
    raise CalibrationDataError(
        f"{where}: unrecognised row with keys {sorted(row)}; expected `messages`, `prompt`+`completion`, `text`, "
        "or `input_ids`+`completion_mask`."
    )


def _pretokenized(row: dict, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    ids = row["input_ids"]
    if "completion_mask" not in row:
        raise CalibrationDataError(f"{where}: pre-tokenized rows need a `completion_mask` beside `input_ids`.")
    mask = row["completion_mask"]
    if len(ids) != len(mask):
        raise CalibrationDataError(
            f"{where}: `input_ids` has {len(ids)} tokens but `completion_mask` has {len(mask)} entries."
        )
    try:
        ids_t = torch.tensor(list(ids), dtype=torch.long)
        mask_t = torch.tensor([bool(m) for m in mask], dtype=torch.bool)
    except (TypeError, ValueError) as exc:
        raise CalibrationDataError(f"{where}: `input_ids` must be integers: {exc}") from exc
    return ids_t, mask_t


def fingerprint_samples(samples: Iterable[CalibrationSample]) -> str:
    """sha256 over token ids and completion masks: equal exactly when the scored tokens are equal."""
    h = hashlib.sha256()
    for s in samples:
        h.update(s.input_ids.to(torch.int64).numpy().tobytes())
        h.update(s.completion_mask.to(torch.uint8).numpy().tobytes())
        h.update(b"|")
    return h.hexdigest()[:32]


def load_calibration_data(
    source: CalibrationSource | CalibrationData,
    tokenizer: Any = None,
    *,
    nsamples: int | None = None,
    max_length: int = 512,
    seed: int = 0,
    split: str = "train",
    chat_template: bool | Literal["auto"] = "auto",
) -> CalibrationData:
    """Load and tokenize calibration rows.

    ``nsamples`` rows are drawn with a seeded shuffle (all rows when None). Truncation keeps the first
    ``max_length`` tokens.
    """
    if isinstance(source, CalibrationData):
        return source
    if nsamples is not None and nsamples <= 0:
        raise CalibrationDataError(f"nsamples must be positive, got {nsamples}.")
    if max_length <= 1:
        raise CalibrationDataError(f"max_length must be at least 2, got {max_length}.")
    name = _describe_source(source)
    rows = _load_rows(source, split)
    if not rows:
        raise CalibrationDataError(f"{name}: the calibration data is empty.")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    if nsamples is not None:
        if nsamples > len(rows):
            warnings.warn(f"{name}: asked for {nsamples} samples but only {len(rows)} exist; using all of them.")
        order = order[:nsamples]

    samples, truncated, dropped = [], 0, 0
    for i in order:
        row, where = rows[i], f"{name}, row {i}"
        if "input_ids" in row and row["input_ids"] is not None:
            ids, mask = _pretokenized(row, where)
        else:
            if tokenizer is None:
                raise CalibrationDataError(f"{where}: a tokenizer is needed for rows that are not pre-tokenized.")
            prompt_ids, completion_ids = _row_to_ids(row, tokenizer, chat_template, where)
            ids = torch.tensor(prompt_ids + completion_ids, dtype=torch.long)
            mask = torch.zeros(len(ids), dtype=torch.bool)
            mask[len(prompt_ids):] = True
        if len(ids) > max_length:
            truncated += 1
            ids, mask = ids[:max_length], mask[:max_length]
        # The first token is never predicted (labels shift by one), so it cannot carry the loss alone.
        if not bool(mask[1:].any()):
            dropped += 1
            continue
        samples.append(CalibrationSample(ids, mask))

    if truncated:
        warnings.warn(f"{name}: {truncated} of {len(order)} samples were truncated to {max_length} tokens.")
    if dropped:
        warnings.warn(f"{name}: dropped {dropped} samples with no completion tokens left to score.")
    if not samples:
        raise CalibrationDataError(f"{name}: no sample has completion tokens to score (after truncation).")
    return CalibrationData(
        samples=samples,
        source=name,
        fingerprint=fingerprint_samples(samples),
        num_truncated=truncated,
        num_dropped=dropped,
        settings={"nsamples": nsamples, "max_length": max_length, "seed": seed, "split": split},
    )


def iter_batches(
    samples: Sequence[CalibrationSample], batch_size: int, pad_token_id: int = 0
) -> Iterator[dict[str, torch.Tensor]]:
    """Right-padded batches; padding has attention 0 and completion 0, so it never counts.

    Samples are grouped by length (longest first) to waste little compute on padding; scores are sums over
    samples, so the order does not change them.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    order = sorted(range(len(samples)), key=lambda i: -len(samples[i]))
    for start in range(0, len(order), batch_size):
        chunk = [samples[i] for i in order[start:start + batch_size]]
        width = max(len(s) for s in chunk)
        input_ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        completion = torch.zeros((len(chunk), width), dtype=torch.bool)
        for row, s in enumerate(chunk):
            n = len(s)
            input_ids[row, :n] = s.input_ids
            attention[row, :n] = 1
            completion[row, :n] = s.completion_mask
        yield {"input_ids": input_ids, "attention_mask": attention, "completion_mask": completion}
