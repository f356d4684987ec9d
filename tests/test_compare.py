"""compare_masks: exact set statistics, Spearman against a brute-force reference, weight drift, files."""

from __future__ import annotations

import copy
import json
import zlib

import numpy as np
import pytest
import torch

from safety_peft.compare import SCHEMA_VERSION, DriftReport, compare_masks, spearman
from safety_peft.errors import MaskMismatchError
from safety_peft.masks import SafetyMasks
from tiny import make_llama

Q0 = "model.layers.0.self_attn.q_proj.weight"
D1 = "model.layers.1.mlp.down_proj.weight"
Q1 = "model.layers.1.self_attn.q_proj.weight"
PNG = b"\x89PNG\r\n\x1a\n"


def bools(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bool)


def hand_made():
    before = {
        Q0: bools([[1, 1, 0, 0], [1, 0, 0, 0]]),  # 3 critical
        D1: bools([[0, 0], [0, 0], [0, 0]]),  # none before or after
        Q1: bools([[0, 0, 0], [0, 0, 0]]),  # none before, 2 after
    }
    after = {
        Q0: bools([[1, 0, 1, 0], [1, 0, 0, 1]]),  # 4 critical, 2 shared, (0,2) and (1,3) new, (0,1) lost
        D1: bools([[0, 0], [0, 0], [0, 0]]),
        Q1: bools([[1, 0, 0], [0, 0, 1]]),
    }
    return before, after


# ---------------------------------------------------------------------------------------- set statistics
def test_hand_made_masks_give_exact_jaccard_overlap_and_counts():
    before, after = hand_made()
    report = compare_masks(before, after)
    q0, d1, q1 = report.layers

    assert (q0["name"], q0["depth"], q0["module"], q0["shape"]) == (Q0, 0, "q_proj", [2, 4])
    assert (d1["depth"], d1["module"]) == (1, "down_proj")
    assert (q0["locked_before"], q0["locked_after"], q0["intersection"], q0["union"]) == (3, 4, 2, 5)
    assert (q0["jaccard"], q0["overlap"]) == (2 / 5, 2 / 3)
    assert (q0["new_critical"], q0["new_critical_unlocked"], q0["lost_critical"]) == (2, 2, 1)
    assert (d1["jaccard"], d1["overlap"], d1["new_critical"]) == (1.0, 1.0, 0)  # both empty: nothing moved
    assert (q1["jaccard"], q1["overlap"], q1["new_critical"]) == (0.0, 1.0, 2)  # A empty: overlap vacuous

    s = report.summary
    assert (s["layers"], s["entries"], s["locked_before"], s["locked_after"]) == (3, 20, 3, 6)
    assert (s["intersection"], s["union"], s["jaccard"], s["overlap"]) == (2, 7, 2 / 7, 2 / 3)
    assert (s["new_critical"], s["new_critical_unlocked"], s["lost_critical"]) == (4, 4, 1)
    assert s["spearman_mean"] is None and s["drift"] is None

    by_module = {r["module"]: r for r in report.by_module}
    assert by_module["q_proj"]["layers"] == 2 and by_module["q_proj"]["jaccard"] == 2 / 7
    assert by_module["down_proj"]["jaccard"] == 1.0


def test_new_critical_unlocked_counts_against_the_given_lock_mask():
    before, after = hand_made()
    locked = {name: mask.clone() for name, mask in before.items()}
    locked[Q0][0, 2] = True  # (0,2) became critical but was locked during training; (1,3) was not
    report = compare_masks(before, after, locked=locked)
    assert report.layers[0]["new_critical"] == 2 and report.layers[0]["new_critical_unlocked"] == 1
    assert report.summary["new_critical_unlocked"] == 3
    assert report.settings["lock_mask"] == "given"


def test_identical_masks_and_scores_did_not_drift():
    before, _ = hand_made()
    scores = {n: torch.arange(m.numel(), dtype=torch.float32).reshape(m.shape) for n, m in before.items()}
    report = compare_masks(before, before, scores_before=scores, scores_after=scores)
    assert report.summary["jaccard"] == 1.0 and report.summary["overlap"] == 1.0
    assert report.summary["new_critical"] == 0 and report.summary["lost_critical"] == 0
    assert [r["spearman"] for r in report.layers] == [1.0, 1.0, 1.0]


def test_safety_masks_of_both_granularities_are_compared_as_full_shape_masks():
    shapes = {Q0: (2, 4)}
    rows = SafetyMasks({Q0: bools([True, False])}, granularity="neuron", shapes=shapes,
                       provenance={"base_model": "org/base", "sparsity": 0.5})
    entries = SafetyMasks({Q0: bools([[1, 1, 1, 0], [0, 0, 0, 1]])}, provenance={"base_model": "org/base"})
    report = compare_masks(rows, entries)
    row = report.layers[0]
    assert (row["locked_before"], row["locked_after"], row["intersection"], row["union"]) == (4, 4, 3, 5)
    assert report.provenance["before"] == {"base_model": "org/base", "sparsity": 0.5}


def test_mismatched_names_shapes_or_half_given_inputs_are_refused():
    before, after = hand_made()
    with pytest.raises(MaskMismatchError, match="only in before"):
        compare_masks(before, {k: v for k, v in after.items() if k != D1})
    with pytest.raises(MaskMismatchError, match="shape"):
        compare_masks(before, {**after, Q0: torch.zeros(4, 2, dtype=torch.bool)})
    with pytest.raises(ValueError, match="both scores"):
        compare_masks(before, after, scores_before={})
    with pytest.raises(ValueError, match="both base_model"):
        compare_masks(before, after, base_model=make_llama(0))


# ---------------------------------------------------------------------------------------- Spearman
def brute_force_spearman(a: list[float], b: list[float]) -> float:
    def ranks(x):
        return [1 + sum(y < v for y in x) + (sum(y == v for y in x) - 1) / 2 for v in x]

    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((p - ma) * (q - mb) for p, q in zip(ra, rb))
    var_a = sum((p - ma) ** 2 for p in ra)
    var_b = sum((q - mb) ** 2 for q in rb)
    return cov / (var_a * var_b) ** 0.5


def test_spearman_matches_a_brute_force_reference_with_ties():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 6, (5, 7), generator=g).float()  # many ties
    b = a + torch.randint(0, 4, (5, 7), generator=g).float()
    masks = {Q0: torch.zeros(5, 7, dtype=torch.bool)}
    report = compare_masks(masks, masks, scores_before={Q0: a}, scores_after={Q0: b})
    row = report.layers[0]
    expected = brute_force_spearman(a.flatten().tolist(), b.flatten().tolist())
    assert row["spearman"] == pytest.approx(expected, abs=1e-12)
    assert (row["spearman_entries"], row["spearman_sampled"]) == (35, False)
    assert spearman(a, -a) == pytest.approx(-1.0)
    assert spearman(a, torch.ones_like(a)) is None  # constant side: undefined
    nan_b = b.clone().flatten()
    nan_b[3] = float("nan")
    keep = [i for i in range(35) if i != 3]
    assert spearman(a, nan_b) == pytest.approx(
        brute_force_spearman([a.flatten()[i].item() for i in keep], [b.flatten()[i].item() for i in keep])
    )


def test_large_weights_use_the_documented_seeded_sample():
    g = torch.Generator().manual_seed(1)
    a = torch.rand(20, 30, generator=g)
    b = a + 0.3 * torch.rand(20, 30, generator=g)
    masks = {Q0: torch.zeros(20, 30, dtype=torch.bool), D1: torch.zeros(3, 3, dtype=torch.bool)}
    scores_a, scores_b = {Q0: a, D1: torch.rand(3, 3)}, {Q0: b, D1: torch.rand(3, 3)}

    report = compare_masks(masks, masks, scores_before=scores_a, scores_after=scores_b,
                           spearman_max_entries=100, seed=7)
    row = report.layers[0]
    assert (row["spearman_entries"], row["spearman_sampled"]) == (100, True)
    idx = np.random.default_rng([7, zlib.crc32(Q0.encode())]).choice(600, size=100, replace=False)
    flat_a, flat_b = a.flatten().tolist(), b.flatten().tolist()
    expected = brute_force_spearman([flat_a[i] for i in idx], [flat_b[i] for i in idx])
    assert row["spearman"] == pytest.approx(expected, abs=1e-12)
    assert report.layers[1]["spearman_sampled"] is False  # 9 entries <= 100: exact

    # the sample depends on (seed, name) only, not on the other weights compared alongside
    alone = compare_masks({Q0: masks[Q0]}, {Q0: masks[Q0]}, scores_before={Q0: a}, scores_after={Q0: b},
                          spearman_max_entries=100, seed=7)
    assert alone.layers[0]["spearman"] == row["spearman"]
    other_seed = compare_masks(masks, masks, scores_before=scores_a, scores_after=scores_b,
                               spearman_max_entries=100, seed=8)
    assert other_seed.layers[0]["spearman"] != row["spearman"]


# ---------------------------------------------------------------------------------------- weight drift
def target_names(model) -> list[str]:
    names = [n for n, _ in model.named_parameters()]
    return [n for n in names if n.startswith("model.layers.") and n.endswith("proj.weight")]


def locked_finetune(base, masks, seed=0):
    """A fine-tuned copy where every unlocked entry moved: where(M, W, W + delta)."""
    tuned = copy.deepcopy(base)
    g = torch.Generator().manual_seed(seed)
    params = dict(tuned.named_parameters())
    with torch.no_grad():
        for name, mask in masks.items():
            w = params[name]
            delta = 0.01 + torch.rand(w.shape, generator=g)
            w.copy_(torch.where(mask, w, w + delta))
    return tuned


def test_drift_of_locked_entries_is_zero_after_a_locked_update():
    base = make_llama(0)
    names = target_names(base)
    g = torch.Generator().manual_seed(3)
    masks = {n: torch.rand(dict(base.named_parameters())[n].shape, generator=g) < 0.3 for n in names}
    tuned = locked_finetune(base, masks)

    report = compare_masks(masks, masks, base_model=base, finetuned_model=tuned)
    drift = report.summary["drift"]
    n_locked = sum(int(m.sum()) for m in masks.values())
    n_total = sum(m.numel() for m in masks.values())
    assert drift["locked_entries"] == n_locked and drift["unlocked_entries"] == n_total - n_locked
    assert drift["locked_changed"] == 0 and drift["locked_max_abs_change"] == 0.0
    assert drift["unlocked_changed"] == n_total - n_locked
    assert 0.01 <= drift["unlocked_mean_abs_change"] <= drift["unlocked_max_abs_change"] <= 1.02
    assert all(r["drift"]["locked_changed"] == 0 for r in report.layers)
    assert "the lock held" in report.to_markdown()

    # {name: tensor} mappings work as well as models
    state = compare_masks(masks, masks, base_model=base.state_dict(), finetuned_model=tuned.state_dict())
    assert state.summary["drift"] == drift


def test_drift_catches_a_broken_lock_even_when_the_value_looks_equal():
    base = make_llama(0)
    name = target_names(base)[0]
    w = dict(base.named_parameters())[name]
    with torch.no_grad():
        w[0, 0] = 0.0
    mask = torch.zeros(w.shape, dtype=torch.bool)
    mask[0, :2] = True
    tuned = copy.deepcopy(base)
    tw = dict(tuned.named_parameters())[name]
    with torch.no_grad():
        tw[0, 0] = -0.0  # equal as a number, different bits: the W + delta*(1-M) bug would do this
        tw[0, 1] += 0.5
    report = compare_masks({name: mask}, {name: mask}, base_model={name: w}, finetuned_model={name: tw})
    drift = report.layers[0]["drift"]
    assert drift["locked_changed"] == 2
    assert drift["locked_max_abs_change"] == pytest.approx(0.5)
    assert drift["unlocked_changed"] == 0
    assert "WARNING: 2 locked entries changed" in report.to_markdown()


def test_missing_weight_in_a_model_is_a_clear_error():
    base = make_llama(0)
    masks = {"nope.weight": torch.zeros(2, 2, dtype=torch.bool)}
    with pytest.raises(MaskMismatchError, match="merge_and_unload"):
        compare_masks(masks, masks, base_model=base, finetuned_model=base)


# ---------------------------------------------------------------------------------------- files
def test_report_files_are_written_atomically_and_parse(tmp_path):
    base = make_llama(0)
    names = target_names(base)
    g = torch.Generator().manual_seed(5)
    params = dict(base.named_parameters())
    before = {n: torch.rand(params[n].shape, generator=g) < 0.2 for n in names}
    after = {n: m ^ (torch.rand(m.shape, generator=g) < 0.05) for n, m in before.items()}
    scores = {n: torch.rand(params[n].shape, generator=g) for n in names}
    scores2 = {n: s + 0.1 * torch.rand(s.shape, generator=g) for n, s in scores.items()}
    report = compare_masks(before, after, scores_before=scores, scores_after=scores2,
                           base_model=base, finetuned_model=locked_finetune(base, before))

    out = report.save(tmp_path / "drift")
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["drift.json", "drift.md", "jaccard_by_depth.png", "overlap_by_depth.png", "by_module.png"]
    )  # and no temporary files left behind
    data = json.loads((out / "drift.json").read_text())
    assert data["schema_version"] == SCHEMA_VERSION == 1
    assert list(data) == ["schema_version", "kind", "settings", "provenance", "summary", "by_module",
                          "layers"]
    assert [r["name"] for r in data["layers"]] == names
    assert data["summary"]["drift"]["locked_changed"] == 0
    assert {r["module"] for r in data["by_module"]} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                         "up_proj", "down_proj"}
    assert DriftReport.load(out).to_dict() == data
    for png in ("jaccard_by_depth.png", "overlap_by_depth.png", "by_module.png"):
        assert (out / png).read_bytes().startswith(PNG)
    md = (out / "drift.md").read_text()
    assert "| metric | value |" in md and "## By module type" in md and "## Per weight" in md
    assert f"| {names[0]} | 0 | q_proj |" in md
    assert "![jaccard by depth](jaccard_by_depth.png)" in md


def test_json_is_strict_even_with_undefined_values():
    masks = {Q0: torch.zeros(2, 2, dtype=torch.bool)}
    flat = torch.ones(2, 2)
    report = compare_masks(masks, masks, scores_before={Q0: flat}, scores_after={Q0: flat})
    data = json.loads(report.to_json())  # no NaN tokens
    assert data["layers"][0]["spearman"] is None and data["summary"]["spearman_mean"] is None
    with pytest.raises(ValueError, match="schema_version"):
        DriftReport.from_json(json.dumps({**data, "schema_version": 99}))


def test_scores_may_cover_more_weights_but_not_fewer():
    before, after = hand_made()
    scores = {n: torch.rand(m.shape) for n, m in before.items()}
    extra = {**scores, "model.layers.9.mlp.up_proj.weight": torch.rand(3, 3)}
    assert len(compare_masks(before, after, scores_before=extra, scores_after=extra).layers) == 3
    with pytest.raises(MaskMismatchError, match="scores_after has no scores for 1 masked weights"):
        fewer = {k: v for k, v in scores.items() if k != Q1}
        compare_masks(before, after, scores_before=scores, scores_after=fewer)
