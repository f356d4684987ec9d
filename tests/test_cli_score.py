"""`safety-peft score` end to end on a tiny saved model, and its errors."""

from __future__ import annotations

import json

import pytest
import torch

from safety_peft.cli import main
from safety_peft.masks import SafetyMasks
from safety_peft.scoring import SafetyScores
from tiny import chat_rows, make_llama, make_tokenizer


@pytest.fixture
def saved_model(tmp_path):
    folder = tmp_path / "model"
    make_llama(0).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture
def data_files(tmp_path):
    safety = tmp_path / "safety.jsonl"
    safety.write_text("\n".join(json.dumps(r) for r in chat_rows(6)))
    utility = tmp_path / "utility.jsonl"
    utility.write_text("\n".join(json.dumps({"prompt": f"Add {i} and {i}.", "completion": f"{2 * i}."}) for i in range(5)))
    return safety, utility


def test_score_writes_masks_and_scores(tmp_path, saved_model, data_files):
    safety, utility = data_files
    out = tmp_path / "masks"
    rc = main([
        "score", "--model", str(saved_model), "--data", str(safety), "--utility-data", str(utility),
        "--method", "wanda", "--sparsity", "0.1", "--utility-sparsity", "0.05", "--group", "layer",
        "--out", str(out), "--save-scores", "--no-progress",
    ])
    assert rc == 0
    model = make_llama(0)
    masks = SafetyMasks.from_pretrained(out, model=model)
    prov = masks.provenance
    assert prov["method"] == "wanda" and prov["sparsity"] == 0.1 and prov["utility_sparsity"] == 0.05
    assert prov["data"]["source"] == str(safety) and prov["utility_data"]["source"] == str(utility)
    # Set difference: never more than p of each layer, and nothing that is top-q for utility.
    scores = SafetyScores.load(out / "safety_scores.safetensors")
    utility_scores = SafetyScores.load(out / "utility_scores.safetensors")
    from safety_peft.selection import top_mask

    top_u = top_mask(utility_scores, 0.05, "layer")
    top_s = top_mask(scores, 0.1, "layer")
    for name in masks:
        assert torch.equal(masks[name], top_s[name] & ~top_u[name]), name
    assert (out / "README.md").is_file()


def test_score_argument_errors(tmp_path, saved_model, data_files, capsys):
    safety, _ = data_files
    with pytest.raises(SystemExit) as exc:
        main(["score", "--model", str(saved_model), "--data", str(safety), "--sparsity", "3", "--out", "x"])
    assert exc.value.code == 2
    assert "between 0 and 1" in capsys.readouterr().err
    rc = main(["score", "--model", str(saved_model), "--data", str(tmp_path / "nope.jsonl"), "--out",
               str(tmp_path / "m"), "--no-progress"])
    assert rc == 1
    assert "no such file" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
    rc = main(["score", "--model", str(saved_model), "--data", str(safety), "--utility-sparsity", "0.1",
               "--out", str(tmp_path / "m")])
    assert rc == 1 and "--utility-data" in capsys.readouterr().err
