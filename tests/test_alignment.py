"""The aligned base: trained once on refusal + benign data, cached under a key of base, data and settings."""

import pytest
from tiny import make_llama, make_tokenizer

from safety_peft import alignment
from safety_peft.alignment import (
    AlignmentSettings,
    aligned_base_info,
    aligned_base_path,
    make_aligned_base,
    training_rows,
)
from safety_peft.builtin_datasets import load_builtin

HARMFUL = [{"messages": [{"role": "user", "content": f"do bad {i}"}, {"role": "assistant", "content": "I can't."}]}
           for i in range(6)]
BENIGN = [{"messages": [{"role": "user", "content": f"add {i}+1"}, {"role": "assistant", "content": str(i + 1)}]}
          for i in range(6)]
TINY = AlignmentSettings(num_epochs=1.0, batch_size=4, max_length=64, max_steps=2)


@pytest.fixture
def tiny_base(tmp_path, monkeypatch):
    monkeypatch.setenv("SAFETY_PEFT_HOME", str(tmp_path / "home"))
    base = tmp_path / "tiny-base"
    make_llama(0).save_pretrained(base)
    make_tokenizer().save_pretrained(base)
    return base


def test_training_rows_mix_and_limit():
    rows = training_rows(HARMFUL, BENIGN, AlignmentSettings(harmful_limit=2, benign_limit=3))
    assert len(rows) == 5
    assert all(r["prompt"][-1]["role"] == "user" and r["completion"][0]["role"] == "assistant" for r in rows)
    assert sum(r["completion"][0]["content"] == "I can't." for r in rows) == 2
    assert rows == training_rows(HARMFUL, BENIGN, AlignmentSettings(harmful_limit=2, benign_limit=3))  # seeded
    assert len(training_rows()) == len(load_builtin("harmful_train")) + len(load_builtin("benign_train_self"))


def test_make_aligned_base_trains_once_then_reuses(tiny_base, monkeypatch):
    path = make_aligned_base(tiny_base, settings=TINY, harmful=HARMFUL, benign=BENIGN, progress=False)
    assert path == aligned_base_path(tiny_base, settings=TINY, harmful=HARMFUL, benign=BENIGN)
    assert (path / "model.safetensors").is_file() and (path / "tokenizer_config.json").is_file()
    info = aligned_base_info(path)
    assert info["global_steps"] == 2 and info["num_rows"] == 12 and info["settings"]["max_steps"] == 2

    def boom(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(alignment, "_train", boom)
    assert make_aligned_base(tiny_base, settings=TINY, harmful=HARMFUL, benign=BENIGN) == path
    # a change of settings or data is a different model
    other = aligned_base_path(tiny_base, settings=AlignmentSettings(**{**TINY.__dict__, "seed": 1}),
                              harmful=HARMFUL, benign=BENIGN)
    assert other != path
    assert aligned_base_path(tiny_base, settings=TINY, harmful=HARMFUL[:5], benign=BENIGN) != path


def test_bad_rows_are_refused():
    with pytest.raises(ValueError, match="assistant"):
        training_rows([{"messages": [{"role": "user", "content": "x"}]}], BENIGN)
