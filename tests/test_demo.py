"""`safety-peft demo --quick` end to end on the embedded SmolLM2-135M-Instruct (the one slow test).

It converts the embedded GGUF model (cached in $SAFETY_PEFT_HOME), trains the quick aligned base, and
runs every demo step on little data. Minutes on 2 CPU cores.
"""

from __future__ import annotations

import json

import pytest

from safety_peft.cli import main
from safety_peft.compare import DriftReport
from safety_peft.masks import SafetyMasks

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "[7/7]" in printed and "report.md" in printed

    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["quick"] is True
    for section in ("aligned_base", "masks", "ablation", "finetune", "drift", "timings", "findings"):
        assert section in report, section
    evals = [report["aligned_base"]["eval"], report["ablation"]["critical"]["eval"],
             report["ablation"]["random"]["eval"], report["finetune"]["plain"]["eval"],
             report["finetune"]["locked"]["eval"]]
    for e in evals:
        assert 0.0 <= e["refusal_rate"] <= 1.0 and 0.0 <= e["over_refusal_rate"] <= 1.0
        assert e["perplexity"] > 1.0 and e["num_harmful"] == e["num_benign"] == 12

    # The critical and the random ablation zeroed the same number of entries: the mask's size.
    masks = SafetyMasks.from_pretrained(out / "masks")
    assert report["masks"]["num_locked"] == masks.num_locked > 0
    assert report["ablation"]["critical"]["zeroed"] == report["ablation"]["random"]["zeroed"] == masks.num_locked

    # Locked entries did not move: checked bit for bit on the merged model and in the drift report.
    lock = report["finetune"]["locked"]["lock_check"]
    assert lock["changed"] == 0 and lock["max_abs_change"] == 0.0 and lock["locked_entries"] == masks.num_locked
    locked_drift = report["drift"]["locked"]["drift"]
    assert locked_drift["locked_changed"] == 0 and locked_drift["unlocked_changed"] > 0
    assert report["drift"]["plain"]["drift"]["locked_changed"] > 0  # without the lock they move

    drift = DriftReport.load(out / "drift")
    assert drift.summary["locked_before"] == masks.num_locked
    md = (out / "report.md").read_text()
    assert "## What this run found" in md and "| aligned base |" in md
    assert "### Refused harmful prompts by category" in md
    by_category = report["aligned_base"]["eval"]["harmful_by_category"]
    assert sum(v["total"] for v in by_category.values()) == 12 and len(by_category) > 1
    for png in ["refusal_rates.png", "critical_density.png"]:
        assert (out / png).read_bytes()[:8] == PNG
    assert any(p.suffix == ".png" for p in (out / "drift").iterdir())
