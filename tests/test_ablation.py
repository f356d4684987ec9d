"""Ablation zeroes exactly the masked entries; the random control matches the counts and is seeded."""

import argparse
import json

import pytest
import torch
from tiny import make_llama, make_tokenizer

from safety_peft.ablation import ablate, random_control_mask, save_ablated
from safety_peft.errors import MaskMismatchError

NAMES = [
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.mlp.down_proj.weight",
    "model.layers.1.self_attn.v_proj.weight",
]


def _masks(model, density=(0.05, 0.2, 0.5), seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    return {n: torch.rand(params[n].shape, generator=gen) < d for n, d in zip(NAMES, density)}


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_ablate_zeroes_exactly_the_mask_entries():
    model = make_llama(0)
    masks = _masks(model)
    before = _snapshot(model)
    result = ablate(model, masks)
    after = dict(model.named_parameters())
    for name, old in before.items():
        new = after[name].detach()
        if name in masks:
            m = masks[name]
            assert torch.all(new[m] == 0)
            assert torch.equal(new[~m], old[~m])  # bit-exact elsewhere
        else:
            assert torch.equal(new, old)
    assert result.zeroed == {n: int(m.sum()) for n, m in masks.items()}
    assert result.totals == {n: m.numel() for n, m in masks.items()}
    assert result.num_zeroed == sum(int(m.sum()) for m in masks.values())
    assert not result.random_control and result.seed is None


def test_random_control_has_same_count_per_matrix_and_is_seeded():
    masks = _masks(make_llama(0))
    model_a, model_b, model_c = make_llama(0), make_llama(0), make_llama(0)
    res_a = ablate(model_a, masks, random_control=True, seed=3)
    ablate(model_b, dict(reversed(list(masks.items()))), random_control=True, seed=3)  # order-free
    ablate(model_c, masks, random_control=True, seed=4)
    assert res_a.zeroed == {n: int(m.sum()) for n, m in masks.items()}
    assert res_a.random_control and res_a.seed == 3
    pa, pb, pc = (dict(m.named_parameters()) for m in (model_a, model_b, model_c))
    for name, m in masks.items():
        za, zb, zc = (p[name].detach() == 0 for p in (pa, pb, pc))
        assert int(za.sum()) == int(m.sum())  # the tiny model has no exact zeros of its own
        assert torch.equal(za, zb)
        assert not torch.equal(za, zc)
        assert not torch.equal(za, m)  # a different set than the critical one


def test_random_control_mask_rows_for_neuron_masks():
    mask = torch.zeros(10, 6, dtype=torch.bool)
    mask[[1, 4, 7]] = True
    rnd = random_control_mask(mask, name="w", seed=0, rows=True)
    rows = rnd.all(dim=1)
    assert int(rows.sum()) == 3 and int(rnd.sum()) == 18
    assert torch.equal(rnd, random_control_mask(mask, name="w", seed=0, rows=True))
    assert not torch.equal(rnd, random_control_mask(mask, name="other", seed=0, rows=True))


def test_neuron_masks_ablate_whole_rows_and_random_rows():
    class NeuronMasks(dict):  # duck-typed like SafetyMasks with neuron granularity
        granularity = "neuron"

    model = make_llama(0)
    name = NAMES[0]
    shape = dict(model.named_parameters())[name].shape
    rows = torch.zeros(shape[0], dtype=torch.bool)
    rows[[0, 5, 9]] = True
    masks = NeuronMasks({name: rows[:, None].expand(shape)})
    result = ablate(model, masks, random_control=True, seed=1)
    zero_rows = (dict(model.named_parameters())[name].detach() == 0).all(dim=1)
    assert int(zero_rows.sum()) == 3 and result.granularity == "neuron"
    assert result.zeroed[name] == 3 * shape[1]


def test_mismatched_masks_are_refused_before_anything_changes():
    model = make_llama(0)
    before = _snapshot(model)
    good = _masks(model)
    with pytest.raises(MaskMismatchError, match="not in the model"):
        ablate(model, {**good, "model.layers.9.mlp.up_proj.weight": torch.ones(2, 2, dtype=torch.bool)})
    with pytest.raises(MaskMismatchError, match="shape"):
        ablate(model, {**good, NAMES[0]: torch.ones(3, 3, dtype=torch.bool)})
    with pytest.raises(TypeError, match="bool"):
        ablate(model, {NAMES[0]: good[NAMES[0]].float()})
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_with_safety_masks_and_save_round_trip(tmp_path):
    masks_mod = pytest.importorskip("safety_peft.masks")
    from transformers import AutoModelForCausalLM

    model = make_llama(0)
    masks = masks_mod.SafetyMasks(_masks(model), provenance={"method": "test"})
    result = ablate(model, masks)
    out = save_ablated(model, make_tokenizer(), tmp_path / "ablated", result)
    record = json.loads((out / "ablation.json").read_text())
    assert record["kind"] == "critical" and record["num_zeroed"] == result.num_zeroed
    assert record["mask_provenance"]["method"] == "test"
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    for name, p in model.named_parameters():
        assert torch.equal(dict(reloaded.named_parameters())[name], p)
    with pytest.raises(FileExistsError):
        save_ablated(model, None, out, result)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_ablate_cli(tmp_path):
    masks_mod = pytest.importorskip("safety_peft.masks")
    from safety_peft.cli import ablate as ablate_cli

    model = make_llama(0)
    model.save_pretrained(tmp_path / "m")
    make_tokenizer().save_pretrained(tmp_path / "m")
    masks_mod.SafetyMasks(_masks(model)).save_pretrained(tmp_path / "masks")
    parser = argparse.ArgumentParser()
    ablate_cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(["ablate", "--model", str(tmp_path / "m"), "--masks", str(tmp_path / "masks"),
                              "--out", str(tmp_path / "out"), "--random-control", "--seed", "2",
                              "--no-check-fingerprint"])
    assert ablate_cli.run(args) == 0
    record = json.loads((tmp_path / "out" / "ablation.json").read_text())
    assert record["kind"] == "random_control" and record["seed"] == 2
    assert record["zeroed"] == {n: int(m.sum()) for n, m in _masks(model).items()}
