"""Scoring under 2 CPU processes (gloo) gives the single-process scores and masks."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from safety_peft.critical import find_safety_critical
from safety_peft.masks import SafetyMasks
from safety_peft.scoring import SafetyScores
from tiny import chat_rows, make_llama, make_tokenizer

WORKER = os.path.join(os.path.dirname(__file__), "dist_score_worker.py")


@pytest.mark.parametrize("method", ["wanda", "snip"])
def test_two_processes_match_one(tmp_path, method):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           WORKER, str(tmp_path), method]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]

    single_masks, single_scores, _ = find_safety_critical(
        make_llama(0), make_tokenizer(), chat_rows(7), utility_data=chat_rows(3)[::-1], method=method,
        sparsity=0.2, utility_sparsity=0.1, batch_size=2, progress=False, return_scores=True,
    )
    for rank in (0, 1):
        masks = SafetyMasks.from_pretrained(tmp_path / f"masks_rank{rank}")
        scores = SafetyScores.load(tmp_path / f"scores_rank{rank}.safetensors")
        assert masks.provenance["data"]["num_samples"] == 7
        assert list(masks) == list(single_masks)
        for name in single_masks:
            torch.testing.assert_close(scores[name], single_scores[name], rtol=1e-5, atol=1e-7)
            assert torch.equal(masks[name], single_masks[name]), name
