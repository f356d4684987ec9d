"""The engine's scores equal the formulas of DESIGN.md computed by brute force, one sample at a time."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

from safety_peft.data import load_calibration_data
from safety_peft.errors import UnsupportedModuleError
from safety_peft.scoring import SafetyScores, score_model
from safety_peft.targets import find_target_modules
from tiny import make_llama


def make_qwen2(seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0,
    )
    return Qwen2ForCausalLM(cfg).eval()


ARCHS = {"llama": make_llama, "qwen2": make_qwen2}


@contextlib.contextmanager
def capture_inputs(model: nn.Module, names: list[str]):
    """Record each target's input by wrapping its forward (a reference independent of the engine's hooks)."""
    modules = dict(model.named_modules())
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    originals = {}
    for n in names:
        mod = modules[n]
        originals[n] = mod.forward

        def wrapped(x, _n=n, _orig=mod.forward):
            seen[_n].append(x.detach().clone())
            return _orig(x)

        mod.forward = wrapped
    try:
        yield seen
    finally:
        for n in names:
            modules[n].forward = originals[n]


def brute_force_wanda(model, samples) -> dict[str, torch.Tensor]:
    targets = find_target_modules(model)
    sq = {n: torch.zeros(m.in_features, dtype=torch.float64) for n, m in targets.items()}
    with torch.no_grad():
        for s in samples:
            with capture_inputs(model, list(targets)) as seen:
                model(input_ids=s.input_ids[None])
            for n in targets:
                (x,) = seen[n]
                for t in range(len(s)):
                    if s.completion_mask[t]:
                        sq[n] += x[0, t].double() ** 2
    return {
        f"{n}.weight": (m.weight.detach().double().abs() * (sq[n] / len(samples)).sqrt()[None, :]).float()
        for n, m in targets.items()
    }


def brute_force_snip(model, samples, per_sample: bool = True) -> dict[str, torch.Tensor]:
    targets = find_target_modules(model)
    weights = [m.weight for m in targets.values()]
    acc = [torch.zeros_like(w, dtype=torch.float64) for w in weights]
    for s in samples:
        ids = s.input_ids[None]
        labels = ids.clone()
        labels[0, ~s.completion_mask] = -100
        loss = model(input_ids=ids, labels=labels).loss  # transformers' own shifted mean cross-entropy
        grads = torch.autograd.grad(loss, weights)
        for a, g in zip(acc, grads):
            a += g.double().abs() if per_sample else g.double()
    return {
        f"{n}.weight": (w.detach().double().abs() * (a if per_sample else a.abs())).float()
        for n, w, a in zip(targets, weights, acc)
    }


def assert_scores_match(got, want, rtol=1e-5):
    assert list(got) == list(want)
    for name in want:
        g, w = got[name], want[name]
        assert g.dtype == torch.float32 and g.shape == w.shape, name
        torch.testing.assert_close(g, w, rtol=rtol, atol=rtol * float(w.abs().max()), msg=name)


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("batch_size", [1, 4])
def test_wanda_matches_brute_force(arch, batch_size, tokenizer, chat_data):
    model = ARCHS[arch]()
    calib = load_calibration_data(chat_data, tokenizer)
    got = score_model(model, tokenizer, calib, "wanda", batch_size=batch_size, progress=False)
    assert_scores_match(got, brute_force_wanda(model, calib.samples))


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("batch_size", [1, 3])
def test_snip_matches_brute_force(arch, batch_size, tokenizer, chat_data):
    model = ARCHS[arch]()
    calib = load_calibration_data(chat_data, tokenizer)
    got = score_model(model, tokenizer, calib, "snip", batch_size=batch_size, progress=False)
    assert_scores_match(got, brute_force_snip(model, calib.samples))


def test_snip_sum_variant_matches_brute_force(tokenizer, chat_data):
    model = make_llama()
    calib = load_calibration_data(chat_data, tokenizer)
    got = score_model(model, tokenizer, calib, "snip", snip_variant="sum", batch_size=4, progress=False)
    assert_scores_match(got, brute_force_snip(model, calib.samples, per_sample=False))
    per_sample = score_model(model, tokenizer, calib, "snip", batch_size=4, progress=False)
    name = next(iter(got))
    # |sum| <= sum |.|, strictly somewhere: the variants really differ.
    assert torch.all(got[name] <= per_sample[name] * (1 + 1e-5))
    assert not torch.allclose(got[name], per_sample[name])


def test_padding_and_batch_size_do_not_change_scores(tokenizer, chat_data):
    model = make_llama()
    for method in ("wanda", "snip"):
        one = score_model(model, tokenizer, chat_data, method, batch_size=1, progress=False)
        many = score_model(model, tokenizer, chat_data, method, batch_size=6, progress=False)
        assert_scores_match(many, dict(one))


def test_scoring_leaves_model_untouched(tokenizer, chat_data):
    model = make_llama()
    model.train()
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    score_model(model, tokenizer, chat_data, "snip", progress=False)
    assert model.training
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_magnitude_and_random(tiny_llama):
    mag = score_model(tiny_llama, method="magnitude", progress=False)
    w = tiny_llama.model.layers[1].self_attn.v_proj.weight
    assert torch.equal(mag["model.layers.1.self_attn.v_proj.weight"], w.detach().abs())
    r1 = score_model(tiny_llama, method="random", seed=3, progress=False)
    r2 = score_model(tiny_llama, method="random", seed=3, progress=False)
    r3 = score_model(tiny_llama, method="random", seed=4, progress=False)
    for name in r1:
        assert r1[name].shape == mag[name].shape
        assert torch.equal(r1[name], r2[name])
        assert not torch.equal(r1[name], r3[name])
        assert float(r1[name].min()) >= 0.0 and float(r1[name].max()) < 1.0


def test_default_targets_are_decoder_linears(tiny_llama):
    names = list(find_target_modules(tiny_llama))
    assert len(names) == 2 * 7
    assert names[0] == "model.layers.0.self_attn.q_proj"
    assert not any("lm_head" in n or "embed" in n for n in names)


def test_target_modules_list_and_regex(tiny_llama, tokenizer, chat_data):
    by_list = find_target_modules(tiny_llama, ["q_proj", "v_proj"])
    assert list(by_list) == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    by_regex = find_target_modules(tiny_llama, r".*\.1\.mlp\.(up|down)_proj")
    assert list(by_regex) == ["model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]
    scores = score_model(tiny_llama, tokenizer, chat_data, "wanda", target_modules=["q_proj"], progress=False)
    assert list(scores) == ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"]


def test_bad_targets_get_clear_errors(tiny_llama):
    with pytest.raises(UnsupportedModuleError, match="output head"):
        find_target_modules(tiny_llama, ["lm_head"])
    with pytest.raises(UnsupportedModuleError, match="Embedding"):
        find_target_modules(tiny_llama, ["embed_tokens"])
    with pytest.raises(ValueError, match="matched no"):
        find_target_modules(tiny_llama, ["nope_proj"])
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64))
    with pytest.raises(UnsupportedModuleError, match="Conv1D"):
        find_target_modules(gpt2)
    # A block mixing Linear and Conv1D layers is refused too, not silently half-targeted.
    from transformers.pytorch_utils import Conv1D

    mixed = make_llama()
    mixed.model.layers[1].mlp.up_proj = Conv1D(64, 32)
    with pytest.raises(UnsupportedModuleError, match="layers.1.mlp.up_proj"):
        find_target_modules(mixed)


def test_unknown_method_and_missing_data(tiny_llama):
    with pytest.raises(ValueError, match="Unknown scoring method"):
        score_model(tiny_llama, method="sparsegpt", progress=False)
    with pytest.raises(ValueError, match="needs calibration data"):
        score_model(tiny_llama, method="wanda", progress=False)


def test_scores_round_trip_and_provenance(tmp_path, tiny_llama, tokenizer, chat_data):
    scores = score_model(tiny_llama, tokenizer, chat_data, "wanda", nsamples=4, progress=False)
    assert scores.provenance["method"] == "wanda"
    assert scores.provenance["data"]["num_samples"] == 4
    assert len(scores.provenance["data"]["fingerprint"]) == 32
    path = scores.save(tmp_path / "s.safetensors")
    loaded = SafetyScores.load(path)
    assert loaded.provenance == scores.provenance
    for name in scores:
        assert torch.equal(loaded[name], scores[name])
    assert [p.name for p in tmp_path.iterdir()] == ["s.safetensors"]
