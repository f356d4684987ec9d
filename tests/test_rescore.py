"""Rescoring repeats the recorded settings; end to end: score -> lock -> train -> rescore -> compare."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

import safety_peft  # noqa: F401  (registers the PEFT method)
from safety_peft.compare import DriftReport, compare_masks
from safety_peft.critical import find_safety_critical
from safety_peft.errors import CalibrationDataError
from safety_peft.rescore import RescoreCallback, rescore
from safety_peft.tuners.safety_freeze import SafetyFreezeConfig
from tiny import chat_rows, make_llama, make_tokenizer


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture
def files(tmp_path):
    safety = write_jsonl(tmp_path / "safety.jsonl", chat_rows(6))
    utility = write_jsonl(tmp_path / "utility.jsonl", [{"prompt": f"Count to {i}.", "completion": " ".join(map(str, range(i)))} for i in range(2, 7)])
    return safety, utility


def score(model, tokenizer, files, **kw):
    safety, utility = files
    args = dict(utility_data=str(utility), method="wanda", sparsity=0.1, utility_sparsity=0.05, nsamples=None,
                progress=False)
    args.update(kw)
    return find_safety_critical(model, tokenizer, str(safety), **args)


@pytest.mark.parametrize("method,granularity", [("wanda", "weight"), ("snip", "neuron")])
def test_unchanged_model_rescores_to_identical_masks(files, method, granularity):
    model, tok = make_llama(0), make_tokenizer()
    before = score(model, tok, files, method=method, granularity=granularity, group="global")
    after = rescore(model, tok, before, progress=False)
    assert list(after) == list(before) and after.granularity == before.granularity
    for name in before:
        assert torch.equal(after[name], before[name]), name
    for key in ("method", "sparsity", "utility_sparsity", "group", "granularity", "data", "utility_data"):
        assert after.provenance[key] == before.provenance[key], key


def test_overrides_and_recorded_data(files, tmp_path):
    model, tok = make_llama(0), make_tokenizer()
    before = score(model, tok, files)
    denser = rescore(model, tok, before, sparsity=0.2, progress=False)
    assert denser.provenance["sparsity"] == 0.2 and denser.num_locked > before.num_locked
    with pytest.raises(TypeError, match="unknown settings"):
        rescore(model, tok, before, sparsity_typo=0.2)
    in_memory = find_safety_critical(model, tok, chat_rows(4), sparsity=0.1, nsamples=None, progress=False)
    with pytest.raises(CalibrationDataError, match="in-memory"):
        rescore(model, tok, in_memory)
    assert rescore(model, tok, in_memory, data=chat_rows(4), progress=False).num_locked == in_memory.num_locked


def test_changed_data_is_reported(files):
    model, tok = make_llama(0), make_tokenizer()
    before = score(model, tok, files)
    safety, _ = files
    write_jsonl(safety, chat_rows(5))
    with pytest.warns(UserWarning, match="differs from the data these masks were scored on"):
        rescore(model, tok, before, progress=False)


def train(model, tokenizer, peft_config, out_dir, callbacks=(), steps=4):
    args = SFTConfig(
        output_dir=str(out_dir), use_cpu=True, bf16=False, gradient_checkpointing=False, max_steps=steps,
        per_device_train_batch_size=2, learning_rate=2e-2, weight_decay=0.1, max_length=64,
        save_strategy="no", report_to="none", logging_steps=1, disable_tqdm=True, seed=0,
    )
    ds = Dataset.from_list([{"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": w * 3}]}
                            for w in ("yes", "ok", "fine", "sure", "right", "good")])
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer,
                         peft_config=peft_config, callbacks=list(callbacks))
    trainer.train()
    return trainer


def test_score_lock_train_rescore_compare(files, tmp_path):
    tok = make_tokenizer()
    base = make_llama(0)
    before = score(base, tok, files)
    callback = RescoreCallback(before, tok, every_n_steps=2, output_dir=tmp_path / "cb")
    trainer = train(make_llama(0), tok, SafetyFreezeConfig(masks=before), tmp_path / "run", [callback])
    peft_model = trainer.model

    # The callback rescored at steps 2 and 4, logged the metrics and saved the masks.
    assert [h["step"] for h in callback.history] == [2, 4]
    logged = [h for h in trainer.state.log_history if "rescore/jaccard" in h]
    assert len(logged) == 2 and all(0.0 <= h["rescore/jaccard"] <= 1.0 for h in logged)
    assert (tmp_path / "cb" / "rescore" / "step-4" / "safety_masks.safetensors").is_file()

    # Rescoring the PeftModel scores its effective weights, and leaves it unchanged.
    after, s_after, _ = rescore(peft_model, tok, before, progress=False, return_scores=True)
    merged = peft_model.merge_and_unload()
    after_merged = rescore(merged, tok, before, progress=False)
    for name in after:
        assert torch.equal(after[name], after_merged[name]), name
    _, s_before, _ = find_safety_critical(base, tok, str(files[0]), utility_data=str(files[1]), sparsity=0.1,
                                          utility_sparsity=0.05, nsamples=None, progress=False, return_scores=True)

    report = compare_masks(before, after, scores_before=s_before, scores_after=s_after,
                           base_model=base, finetuned_model=merged)
    drift = report.summary["drift"]
    assert drift["locked_changed"] == 0 and drift["locked_max_abs_change"] == 0.0
    assert drift["unlocked_changed"] > 0.5 * drift["unlocked_entries"]
    assert report.summary["jaccard"] < 1.0  # training moved the critical set
    out = report.save(tmp_path / "drift")
    loaded = DriftReport.load(out / "drift.json")
    assert loaded.summary["locked_before"] == before.num_locked
    assert (out / "drift.md").read_text().count("|") > 10
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs and all((out / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
