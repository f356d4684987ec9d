"""The safety_freeze PEFT method: lock math, merge, adapters, save/load and the errors a user can meet."""

import json
import os

import pytest
import torch
import torch.nn.functional as F
from _tuner_utils import bits, linear_names, lock_stats, random_masks
from hub_server import fake_hub  # noqa: F401  (pytest fixture)
from peft import PeftModel, get_peft_model
from safetensors import safe_open
from tiny import make_llama
from torch import nn

import safety_peft.tuners  # noqa: F401  (registers the method)
from safety_peft.errors import MaskFileError, MaskMismatchError, UnsupportedModuleError
from safety_peft.masks import SafetyMasks
from safety_peft.tuners.safety_freeze import SafetyFreezeConfig
from safety_peft.tuners.safety_freeze.layer import Linear as LockedLinear
from safety_peft.tuners.safety_freeze.layer import Lock, _LockedLinear, locked_weight
from safety_peft.verification import LockViolationError, snapshot_locked, verify_lock

Q = "model.layers.0.self_attn.q_proj.weight"


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def peft(masks, model=None, **kw):
    return get_peft_model(model if model is not None else make_llama(0), SafetyFreezeConfig(masks=masks, **kw))


def train_steps(model, steps=3, lr=1e-2, autocast=True):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.1)
    x = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return x


# ------------------------------------------------------------------------------------------- lock math
@pytest.mark.parametrize("density", [0.05, 0.9])  # flat indices / bool mask inside Lock
def test_locked_weight_is_where_bit_for_bit_even_for_signed_zero_and_nan(density):
    torch.manual_seed(0)
    w = torch.randn(16, 12)
    mask = torch.rand(16, 12) < density
    mask[0, 0] = mask[1, 1] = mask[2, 2] = True
    w[0, 0], w[1, 1] = -0.0, float("nan")
    w[2, 2] = 1.0
    delta = torch.randn(16, 12)
    delta[2, 2] = float("nan")  # a NaN update on a locked entry must not leak (W + Δ·(1-M) would)
    lock = Lock(mask, (16, 12))
    assert (lock.flat is not None) == (density < 0.5)
    got = locked_weight(w, delta, lock, torch.float32)
    expected = torch.where(mask, w, w + delta)
    assert torch.equal(bits(got), bits(expected))
    assert torch.equal(bits(got[mask]), bits(w[mask]))
    assert torch.equal(lock.bool_mask(), mask)


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("rows", [False, True])
def test_locked_linear_matches_autograd_through_where(autocast, rows):
    """The memory-lean autograd Function gives the same output and gradients as plain autograd."""
    torch.manual_seed(0)
    w, b = torch.randn(6, 5), torch.randn(6)
    mask = torch.rand(6) < 0.5 if rows else torch.rand(6, 5) < 0.3
    full = mask[:, None].expand(6, 5) if rows else mask
    delta = torch.randn(6, 5, requires_grad=True)
    x = torch.randn(3, 4, 5, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = _LockedLinear.apply(x, w, delta, Lock(mask, (6, 5)), b)
        y_ref = F.linear(x, torch.where(full, w, w + delta), b)
    grad = torch.randn(y.shape).to(y.dtype)
    gx, gd = torch.autograd.grad(y, (x, delta), grad)
    gx_ref, gd_ref = torch.autograd.grad(y_ref, (x, delta), grad)
    assert y.dtype == y_ref.dtype and torch.equal(y, y_ref)
    assert torch.equal(gx, gx_ref) and torch.equal(gd, gd_ref)
    assert gd.dtype == torch.float32 and bool((gd[full] == 0).all())


def test_lora_with_neuron_masks_masks_output_rows_without_forming_delta():
    """base(x) + where(row_locked, 0, lora(x)) equals F.linear(x, where(M, W, W + s·B·A)) for row masks."""
    model = make_llama(0)
    masks = random_masks(model, 0.4, neuron=True)
    pm = peft(masks, model, adapter="lora", r=4, init_weights=False)
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.lock("default").rows is not None
    x = torch.randn(2, 3, 32)
    with torch.no_grad():
        got = layer(x)
        w = layer.get_base_layer().weight
        rows = masks.row_mask(Q)[:, None]
        expected = F.linear(x, torch.where(rows, w, w + layer.get_delta_weight("default")))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(got[..., masks.row_mask(Q)], F.linear(x, w)[..., masks.row_mask(Q)])


@pytest.mark.parametrize("adapter", ["delta", "lora"])
@pytest.mark.parametrize("neuron", [False, True])
def test_forward_equals_merged_forward_and_merge_keeps_locked_bits(adapter, neuron):
    base = make_llama(0)
    ref = state(base)
    masks = random_masks(base, 0.3, neuron=neuron)
    pm = peft(masks, adapter=adapter, r=4, init_weights=False)
    x = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        out = pm(input_ids=x).logits
        pm.merge_adapter()
        merged_out = pm(input_ids=x).logits
    torch.testing.assert_close(out, merged_out, rtol=1e-4, atol=1e-5)
    merged_weights = {n: p for n, p in pm.named_parameters()}
    for name in masks.names:
        w = merged_weights[f"base_model.model.{name[:-len('.weight')]}.base_layer.weight"]
        assert torch.equal(bits(w)[masks[name]], bits(ref[name])[masks[name]])
        assert not torch.equal(w, ref[name])


def test_unmerge_restores_base_bits_exactly():
    base = make_llama(0)
    ref = state(base)
    pm = peft(random_masks(base), init_weights=False)
    pm.merge_adapter()
    pm.unmerge_adapter()
    for name, value in pm.get_base_model().state_dict().items():
        key = name.replace(".base_layer.", ".")
        if key in ref:
            assert torch.equal(bits(value), bits(ref[key])), name


def test_bf16_base_model_keeps_locked_bits_and_trains_a_float32_delta():
    base = make_llama(0).to(torch.bfloat16)
    ref = state(base)
    masks = random_masks(base)
    pm = peft(masks, make_llama(0).to(torch.bfloat16))
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.safety_freeze_delta["default"].dtype == torch.float32
    train_steps(pm, autocast=False)
    broken, changed = lock_stats(pm.merge_and_unload(), ref, masks)
    assert broken == 0 and changed > 0.5


def test_disable_adapter_gives_the_base_model():
    base = make_llama(0)
    pm = peft(random_masks(base), init_weights=False)
    x = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        base_out = base(input_ids=x).logits
        with pm.disable_adapter():
            disabled = pm(input_ids=x).logits
        enabled = pm(input_ids=x).logits
    assert torch.equal(disabled, base_out)
    assert not torch.allclose(enabled, base_out)


def test_several_adapters_by_name(tmp_path):
    base = make_llama(0)
    masks_a, masks_b = random_masks(base, 0.2, seed=1), random_masks(base, 0.6, seed=2)
    pm = peft(masks_a, init_weights=False)
    pm.add_adapter("other", SafetyFreezeConfig(masks=masks_b, adapter="lora", r=2, init_weights=False))
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    assert torch.equal(layer.lock("other").bool_mask(), masks_b[Q])
    x = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        out_a = pm(input_ids=x).logits
        pm.set_adapter("other")
        out_b = pm(input_ids=x).logits
    assert not torch.allclose(out_a, out_b)
    assert pm.get_masks("other") == masks_b and pm.get_masks("default") == masks_a
    pm.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_llama(0), tmp_path / "other", adapter_name="other")
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=x).logits, out_b)


def test_only_adapter_params_and_modules_to_save_train(tmp_path):
    base = make_llama(0)
    pm = peft(random_masks(base), modules_to_save=["model.norm"])
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all("safety_freeze_delta" in n or "modules_to_save" in n for n in trainable)
    assert any("modules_to_save" in n for n in trainable)
    pm.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        assert "base_model.model.model.norm.weight" in set(f.keys())


def test_lock_summary_counts_what_really_trains(capsys):
    base = make_llama(0)
    masks = random_masks(base, 0.25)
    pm = peft(masks)
    s = pm.lock_summary()
    assert s["locked_entries"] == masks.num_locked
    assert s["trainable_entries"] == masks.num_entries - masks.num_locked
    assert s["trainable_params"] == masks.num_entries  # a dense Δ per target weight
    pm.print_lock_summary()
    assert f"{masks.num_locked:,d}" in capsys.readouterr().out
    lora = peft(masks, adapter="lora", r=2).lock_summary()
    assert lora["trainable_params"] == sum(2 * sum(s) for s in (masks.shape(n) for n in masks.names))


# --------------------------------------------------------------------------------------- save and load
@pytest.mark.parametrize("adapter", ["delta", "lora"])
@pytest.mark.parametrize("neuron", [False, True])
def test_save_and_load_restore_the_adapter_exactly(tmp_path, adapter, neuron):
    base = make_llama(0)
    masks = random_masks(base, 0.1, neuron=neuron)
    pm = peft(masks, adapter=adapter, r=4)
    x = train_steps(pm)
    with torch.no_grad():
        expected = pm(input_ids=x).logits
    pm.save_pretrained(tmp_path)

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "SAFETY_FREEZE" and config["masks"] is None
    assert set(config["masks_header"]["masks"]) == set(masks.names)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        codes = {k: f.get_tensor(k) for k in f.keys() if "mask_code" in k}
    encoded, _ = masks.to_encoded()
    assert len(codes) == len(masks)
    assert sum(c.numel() * c.element_size() for c in codes.values()) == sum(
        t.numel() * t.element_size() for t in encoded.values()
    )  # the compact encoding, not a dense bool tensor per layer

    loaded = PeftModel.from_pretrained(make_llama(0), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=x).logits, expected)
    assert loaded.get_masks() == masks

    hf = make_llama(0)
    hf.load_adapter(str(tmp_path))
    with torch.no_grad():
        assert torch.equal(hf(input_ids=x).logits, expected)


def test_a_config_without_its_weights_refuses_to_run(tmp_path):
    base = make_llama(0)
    peft(random_masks(base)).save_pretrained(tmp_path)
    config = SafetyFreezeConfig.from_pretrained(str(tmp_path))
    pm = get_peft_model(make_llama(0), config)
    with pytest.raises(MaskFileError, match="were never loaded"):
        pm(input_ids=torch.tensor([[1, 2, 3]]))


def test_masks_from_a_folder_and_config_json_stays_small(tmp_path):
    base = make_llama(0)
    masks = random_masks(base, 0.5)
    masks.save_pretrained(tmp_path / "masks")
    pm = peft(str(tmp_path / "masks"))
    assert pm.get_masks() == masks
    pm.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["masks_source"] == str(tmp_path / "masks")
    assert os.path.getsize(tmp_path / "adapter" / "adapter_config.json") < 8000


# ------------------------------------------------------------------------------------------ bad input
def test_masks_for_another_model_are_refused():
    other = make_llama(0, hidden_size=48, intermediate_size=96)
    with pytest.raises(MaskMismatchError, match="shape of"):
        peft(random_masks(other))
    renamed = random_masks(make_llama(0), fingerprint=False)
    renamed = SafetyMasks({n.replace("layers.1", "layers.7"): renamed.mask(n) for n in renamed.names})
    with pytest.raises(MaskMismatchError, match="not parameters of this model"):
        peft(renamed)
    with pytest.raises(MaskMismatchError, match="fingerprint differs"):
        peft(random_masks(make_llama(1)))  # same shapes, other weights
    peft(random_masks(make_llama(1)), check_fingerprint=False)  # allowed on purpose


def test_a_saved_adapter_is_checked_against_the_model_it_is_loaded_on(tmp_path):
    peft(random_masks(make_llama(0))).save_pretrained(tmp_path)
    with pytest.raises(MaskMismatchError, match="fingerprint differs"):
        PeftModel.from_pretrained(make_llama(1), tmp_path)


def test_a_targeted_module_without_a_mask_is_refused():
    base = make_llama(0)
    masks = random_masks(base, names=[n for n in linear_names(base) if "q_proj" in n])
    with pytest.raises(MaskMismatchError, match=r"have no mask: 'model.layers.0.self_attn.k_proj'"):
        peft(masks, target_modules=["q_proj", "k_proj"])
    assert len(peft(masks).base_model.lock_layers()) == 2  # default targets: exactly the masked modules


def test_a_subset_of_the_masked_modules_can_be_targeted(tmp_path):
    base = make_llama(0)
    masks = random_masks(base)
    pm = peft(masks, target_modules=["q_proj"])
    assert sorted(pm.base_model.lock_layers()) == sorted(n for n in masks.names if "q_proj" in n)
    pm.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_llama(0), tmp_path)
    assert loaded.get_masks().names == sorted(n for n in masks.names if "q_proj" in n)


def test_corrupt_mask_file_and_corrupt_adapter_are_refused(tmp_path):
    base = make_llama(0)
    (tmp_path / "masks").mkdir()
    (tmp_path / "masks" / "safety_masks.safetensors").write_bytes(b"\x00\x01 not a safetensors file")
    with pytest.raises(MaskFileError, match="truncated or corrupt"):
        peft(str(tmp_path / "masks"))

    peft(random_masks(base)).save_pretrained(tmp_path / "adapter")
    from safetensors.torch import load_file, save_file

    path = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = load_file(path)
    key = next(k for k in tensors if "mask_code" in k)
    tensors[key] = tensors[key].clone()
    tensors[key][0] ^= 1  # one flipped bit in one mask
    save_file(tensors, path)
    loaded = PeftModel.from_pretrained(make_llama(0), tmp_path / "adapter")
    with pytest.raises(MaskFileError, match="checksum mismatch"):
        loaded(input_ids=torch.tensor([[1, 2, 3]]))


def test_lm_head_as_target_is_refused():
    base = make_llama(0)
    with pytest.raises(UnsupportedModuleError, match="output head"):
        SafetyFreezeConfig(masks=random_masks(base), target_modules=["q_proj", "lm_head"])
    with pytest.raises(UnsupportedModuleError, match="output head"):
        peft(random_masks(base), target_modules=r".*(q_proj|lm_head)")


def test_unsupported_layer_types_are_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=32))
    shape = gpt2.transformer.h[0].attn.c_attn.weight.shape
    masks = SafetyMasks({"transformer.h.0.attn.c_attn.weight": torch.zeros(shape, dtype=torch.bool)})
    with pytest.raises(UnsupportedModuleError, match="Conv1D"):
        get_peft_model(gpt2, SafetyFreezeConfig(masks=masks))
    llama = make_llama(0)
    masks = SafetyMasks({"model.embed_tokens.weight": torch.zeros(128, 32, dtype=torch.bool)})
    with pytest.raises(UnsupportedModuleError, match="Embedding"):
        peft(masks, llama)
    with pytest.raises(UnsupportedModuleError, match="Linear"):
        LockedLinear(nn.Conv1d(2, 2, 1), "default", mask_name="x", adapter_masks=None, code=torch.zeros(1))


def test_masks_are_required():
    with pytest.raises(ValueError, match="needs masks"):
        get_peft_model(make_llama(0), SafetyFreezeConfig())
    with pytest.raises(TypeError, match="SafetyMasks object"):
        SafetyFreezeConfig(masks={"a": torch.zeros(2, dtype=torch.bool)})


# -------------------------------------------------------------------------------------------- verify
def test_verify_lock_sees_every_changed_bit():
    base = make_llama(0)
    ref = state(base)
    masks = random_masks(base)
    pm = peft(masks, make_llama(0), init_weights=False)
    report = verify_lock(pm, masks, base)
    assert report.ok and report.num_locked == masks.num_locked and report.max_abs_change == 0.0
    snapshot = snapshot_locked(ref, masks)
    assert verify_lock(pm, masks, snapshot).ok

    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    idx = masks[Q].nonzero()[0].tolist()
    with torch.no_grad():
        layer.get_base_layer().weight[idx[0], idx[1]] += 0.5
    report = verify_lock(pm, masks, snapshot)
    assert not report.ok and report.num_changed == 1 and report.changed == {Q: 1}
    assert report.max_abs_change == pytest.approx(0.5, rel=1e-5)
    assert "LOCK BROKEN" in str(report)

    plain = make_llama(0)
    signed = dict(ref)
    signed[Q] = ref[Q].clone()
    signed[Q][idx[0], idx[1]] = -0.0
    with torch.no_grad():
        plain.get_parameter(Q)[idx[0], idx[1]] = 0.0
    report = verify_lock(plain, masks, signed)  # -0.0 became +0.0: equal values, different bits
    assert report.num_changed == 1 and report.max_abs_change == 0.0 and not report.ok


def test_lock_check_callback_raises_when_a_locked_entry_moved():
    from safety_peft.callbacks import LockCheckCallback

    base = make_llama(0)
    masks = random_masks(base)
    pm = peft(masks, make_llama(0))
    cb = LockCheckCallback()  # masks taken from the model
    cb.on_train_begin(None, None, None, model=pm)
    assert cb.check(pm).ok
    with torch.no_grad():
        pm.base_model.model.model.layers[1].mlp.down_proj.get_base_layer().weight.mul_(2)
    with pytest.raises(LockViolationError, match="LOCK BROKEN"):
        cb.check(pm, "test")
    logged = LockCheckCallback(masks, on_violation="log")
    logged.on_train_begin(None, None, None, model=base)
    assert not logged.check(pm).ok


def test_push_to_hub_and_load_by_repo_id(fake_hub, tmp_path, monkeypatch):  # noqa: F811
    """An adapter is self-contained: PEFT's own push_to_hub and from_pretrained need no extra code."""
    import huggingface_hub.hf_api

    # peft calls huggingface_hub.file_exists, bound to a client made at import time with the real endpoint
    monkeypatch.setattr(huggingface_hub.hf_api.api, "endpoint", fake_hub.endpoint)
    base = make_llama(0)
    masks = random_masks(base, 0.2)
    masks.push_to_hub("org/tiny-masks")
    pm = peft("org/tiny-masks", make_llama(0), init_weights=False)  # masks by Hub repo id
    assert pm.get_masks() == masks
    x = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        expected = pm(input_ids=x).logits
    pm.push_to_hub("org/tiny-adapter")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(fake_hub.files("org/tiny-adapter"))
    loaded = PeftModel.from_pretrained(make_llama(0), "org/tiny-adapter")
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=x).logits, expected)
    assert loaded.get_masks() == masks


@pytest.mark.parametrize("density", [0.2, 0.8])  # index locks and bool-mask locks
def test_two_active_adapters_train_and_merge_like_their_forward(density):
    base = make_llama(0)
    ref = state(base)
    masks_a, masks_b = random_masks(base, density, seed=1), random_masks(base, density, seed=2)
    pm = peft(masks_a)
    pm.add_adapter("other", SafetyFreezeConfig(masks=masks_b, adapter="lora", r=2))
    pm.base_model.set_adapter(["default", "other"])
    assert {n.split(".")[-1] for n, p in pm.named_parameters() if p.requires_grad} >= {"default", "weight"}
    x = train_steps(pm, steps=2, autocast=False)
    with torch.no_grad():
        out = pm(input_ids=x).logits
        merged = pm.merge_and_unload()
        torch.testing.assert_close(merged(input_ids=x).logits, out, rtol=1e-4, atol=1e-5)
    for name in masks_a.names:  # applied in order: entries both adapters lock keep the base bits
        both = masks_a[name] & masks_b[name]
        assert torch.equal(bits(merged.get_parameter(name))[both], bits(ref[name])[both])
        assert not torch.equal(merged.get_parameter(name), ref[name])


def test_print_trainable_parameters_counts_only_unlocked_entries(capsys):
    from peft import LoraConfig, get_peft_model as plain_get_peft_model

    base = make_llama(0)
    masks = random_masks(base, 0.3)
    locked = sum(int(masks[n].sum()) for n in masks)
    targets = sum(masks[n].numel() for n in masks)
    delta_model = get_peft_model(make_llama(0), SafetyFreezeConfig(masks=masks))
    trainable, total = delta_model.get_nb_trainable_parameters()
    assert trainable == targets - locked
    delta_model.print_trainable_parameters()
    assert f"trainable params: {targets - locked:,d}" in capsys.readouterr().out
    # Other PEFT methods keep PEFT's own count.
    lora = plain_get_peft_model(make_llama(0), LoraConfig(r=2, target_modules=["q_proj"]))
    assert lora.get_nb_trainable_parameters()[0] == sum(p.numel() for p in lora.parameters() if p.requires_grad)
