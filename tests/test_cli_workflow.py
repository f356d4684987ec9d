"""The CLI workflow after scoring: rescore -> compare -> push (to a loopback fake Hub)."""

from __future__ import annotations

import json

import torch

from hub_server import fake_hub  # noqa: F401  (pytest fixture)
from safety_peft.cli import main
from safety_peft.masks import SafetyMasks
from tiny import chat_rows, make_llama, make_tokenizer


def test_score_rescore_compare_push(tmp_path, fake_hub, capsys):  # noqa: F811
    base, tuned = tmp_path / "base", tmp_path / "tuned"
    make_llama(0).save_pretrained(base)
    make_tokenizer().save_pretrained(base)
    model = make_llama(0)
    with torch.no_grad():  # a "fine-tuned" model: every weight of layer 1 moved
        for p in model.model.layers[1].parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(tuned)
    make_tokenizer().save_pretrained(tuned)
    data = tmp_path / "safety.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in chat_rows(5)))

    assert main(["score", "--model", str(base), "--data", str(data), "--sparsity", "0.1", "--nsamples", "5",
                 "--out", str(tmp_path / "m0"), "--save-scores", "--no-progress"]) == 0
    # Rescoring the unchanged base reproduces the masks exactly.
    assert main(["rescore", "--model", str(base), "--masks", str(tmp_path / "m0"), "--out", str(tmp_path / "same"),
                 "--no-progress"]) == 0
    m0, same = SafetyMasks.from_pretrained(tmp_path / "m0"), SafetyMasks.from_pretrained(tmp_path / "same")
    assert all(torch.equal(m0[n], same[n]) for n in m0)

    assert main(["rescore", "--model", str(tuned), "--masks", str(tmp_path / "m0"), "--out", str(tmp_path / "m1"),
                 "--save-scores", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "m0"), str(tmp_path / "m1"), "--out", str(tmp_path / "drift"),
                 "--base-model", str(base), "--finetuned-model", str(tuned)]) == 0
    assert "Jaccard" in capsys.readouterr().out
    report = json.loads((tmp_path / "drift" / "drift.json").read_text())
    layers = {row["name"]: row for row in report["layers"]}
    assert layers["model.layers.0.self_attn.q_proj.weight"]["jaccard"] == 1.0  # layer 0 did not move
    assert layers["model.layers.1.self_attn.q_proj.weight"]["jaccard"] < 1.0
    assert all(row["spearman"] is not None for row in report["layers"])

    assert main(["push", str(tmp_path / "m0"), "org/tiny-masks"]) == 0
    assert main(["push", str(tmp_path / "drift"), "org/tiny-drift"]) == 0
    pulled = SafetyMasks.from_pretrained("org/tiny-masks", model=make_llama(0))
    assert all(torch.equal(pulled[n], m0[n]) for n in m0)
    assert "drift.json" in fake_hub.files("org/tiny-drift")
