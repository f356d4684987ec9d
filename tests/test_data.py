"""Calibration rows in every format become ids + completion masks; bad data gets a clear error."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset

from safety_peft.data import iter_batches, load_calibration_data
from safety_peft.errors import CalibrationDataError
from tiny import make_tokenizer

CHAT = [{"role": "user", "content": "How do I pick a lock?"}, {"role": "assistant", "content": "I won't help."}]


def completion_text(tok, sample):
    return tok.decode(sample.input_ids[sample.completion_mask])


def test_messages_rows_mark_last_assistant_turn(tokenizer):
    (s,) = load_calibration_data([{"messages": CHAT}], tokenizer).samples
    assert completion_text(tokenizer, s) == "I won't help.<|im_end|>\n"
    full = tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert tokenizer.decode(s.input_ids) == full


def test_conversational_and_string_prompt_completion(tokenizer):
    conv = {"prompt": CHAT[:1], "completion": CHAT[1:]}
    strings = {"prompt": CHAT[0]["content"], "completion": CHAT[1]["content"]}
    a, b = load_calibration_data([conv, strings], tokenizer, seed=0).samples
    # With a chat template, strings are wrapped as one user turn and one assistant turn (documented).
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.completion_mask, b.completion_mask)
    (plain,) = load_calibration_data([strings], tokenizer, chat_template=False).samples
    assert tokenizer.decode(plain.input_ids) == "How do I pick a lock?I won't help.<|im_end|>"
    assert completion_text(tokenizer, plain) == "I won't help.<|im_end|>"


def test_text_and_pretokenized_rows(tokenizer):
    (t,) = load_calibration_data([{"text": "plain words"}], tokenizer).samples
    assert bool(t.completion_mask.all())
    row = {"input_ids": [5, 6, 7, 8], "completion_mask": [0, 0, 1, 1]}
    (p,) = load_calibration_data([row]).samples
    assert p.input_ids.tolist() == [5, 6, 7, 8] and p.completion_mask.tolist() == [False, False, True, True]


def test_files_and_datasets(tmp_path, tokenizer):
    rows = [{"messages": CHAT}] * 3
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    arr = tmp_path / "d.json"
    arr.write_text(json.dumps(rows))
    parquet = tmp_path / "d.parquet"
    Dataset.from_list([{"prompt": "a b", "completion": "c d"}] * 2).to_parquet(str(parquet))
    csv = tmp_path / "d.csv"
    csv.write_text("text\nhello\nworld\n")
    assert len(load_calibration_data(jsonl, tokenizer)) == 3
    assert len(load_calibration_data(arr, tokenizer)) == 3
    assert len(load_calibration_data(parquet, tokenizer)) == 2
    assert len(load_calibration_data(csv, tokenizer)) == 2
    assert len(load_calibration_data(Dataset.from_list(rows), tokenizer)) == 3


def test_nsamples_is_seeded_and_fingerprint_tracks_content(tokenizer):
    rows = [{"text": f"sample {i}"} for i in range(10)]
    a = load_calibration_data(rows, tokenizer, nsamples=4, seed=1)
    b = load_calibration_data(rows, tokenizer, nsamples=4, seed=1)
    c = load_calibration_data(rows, tokenizer, nsamples=4, seed=2)
    assert len(a) == 4 and a.fingerprint == b.fingerprint != c.fingerprint


def test_truncation_is_counted_and_empty_completions_dropped(tokenizer):
    long_prompt = {"prompt": "x" * 100, "completion": "y"}
    fits = {"prompt": "x", "completion": "yes"}
    with pytest.warns(UserWarning, match="truncated"):
        data = load_calibration_data([long_prompt, fits], tokenizer, max_length=40, chat_template=False)
    assert data.num_truncated == 1 and data.num_dropped == 1 and len(data) == 1
    assert all(len(s) <= 40 for s in data.samples)


def test_batches_pad_on_the_right_and_padding_never_counts(tokenizer):
    data = load_calibration_data([{"text": "ab"}, {"text": "abcdef"}], tokenizer)
    (batch,) = list(iter_batches(data.samples, 4, pad_token_id=tokenizer.pad_token_id))
    assert batch["input_ids"].shape == (2, 6)
    assert batch["attention_mask"].tolist() == [[1] * 6, [1, 1, 0, 0, 0, 0]]
    assert batch["completion_mask"][1].tolist() == [True, True, False, False, False, False]
    assert batch["input_ids"][1, 2:].eq(tokenizer.pad_token_id).all()


@pytest.mark.parametrize(
    "rows, match",
    [
        ([], "empty"),
        ([{"foo": 1}], "unrecognised row"),
        ([{"messages": [{"role": "user", "content": "hi"}]}], "no assistant turn"),
        ([{"messages": "hello"}], "non-empty list"),
        ([{"input_ids": [1, 2, 3]}], "completion_mask"),
        ([{"input_ids": [1, 2, 3], "completion_mask": [1, 1]}], "3 tokens"),
        ([{"prompt": "a", "completion": 3}], "strings or message lists"),
    ],
)
def test_malformed_rows(rows, match, tokenizer):
    with pytest.raises(CalibrationDataError, match=match):
        load_calibration_data(rows, tokenizer)


def test_missing_chat_template_and_bad_files(tmp_path):
    no_template = make_tokenizer(chat_template=None)
    with pytest.raises(CalibrationDataError, match="chat template"):
        load_calibration_data([{"messages": CHAT}], no_template)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(CalibrationDataError, match="line 2"):
        load_calibration_data(bad, no_template)
    with pytest.raises(CalibrationDataError, match="no such file"):
        load_calibration_data(tmp_path / "missing.jsonl", no_template)
    with pytest.raises(CalibrationDataError, match="unsupported file type"):
        (tmp_path / "d.txt").write_text("x")
        load_calibration_data(tmp_path / "d.txt", no_template)
    with pytest.raises(CalibrationDataError, match="nsamples"):
        load_calibration_data([{"text": "x y"}], no_template, nsamples=0)


def test_local_files_are_recorded_by_absolute_path(tmp_path, monkeypatch, tokenizer):
    (tmp_path / "rel.jsonl").write_text(json.dumps({"text": "hello"}) + "\n")
    monkeypatch.chdir(tmp_path)
    data = load_calibration_data("rel.jsonl", tokenizer)
    assert data.source == str(tmp_path / "rel.jsonl")


def test_unknown_builtin_dataset_is_a_clear_error():
    with pytest.raises(CalibrationDataError, match=r"Unknown built-in dataset 'nope'.*harmful_train"):
        load_calibration_data("builtin:nope", make_tokenizer())
