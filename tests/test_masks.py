"""The mask artifact: exact round trips, size bound, atomic saves, and clear errors for bad files/models."""

import json
import math
import os
import struct
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_save
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import safety_peft.masks as masks_module
from safety_peft.errors import MaskFileError, MaskMismatchError
from safety_peft.masks import HEADER_KEY, MASKS_FILENAME, SafetyMasks, render_model_card
from safety_peft.provenance import library_versions, model_fingerprint, model_identity
from safety_peft.selection import select_critical

# File bytes beyond the encoded masks: the 8-byte length, safetensors' JSON header (an entry per
# tensor, with its name) and our JSON document (an entry per mask with its name, the checksum, and the
# provenance, JSON-escaped once more inside the metadata string). Measured: an empty artifact is 224
# bytes; the tiny Llama below (14 masks, 36-character names, ~390 bytes of provenance) has 3.5 KB of
# overhead, i.e. about 128 bytes per mask on top of each name twice and the provenance twice.
FIXED_OVERHEAD = 512
PER_MASK_OVERHEAD = 200


def overhead_bound(masks: SafetyMasks) -> int:
    names = sum(2 * len(name.encode()) for name in masks.names)
    return FIXED_OVERHEAD + PER_MASK_OVERHEAD * len(masks) + names + 2 * len(json.dumps(masks.provenance))


def tiny_llama(seed=0, layers=2, intermediate=64, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        **overrides,
    )
    return LlamaForCausalLM(config).eval()


def target_names(model: nn.Module) -> list[str]:
    return [
        name + ".weight"
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and ".layers." in name
    ]


def masks_for(model: nn.Module, sparsity=0.05, granularity="weight", group="layer") -> SafetyMasks:
    """Magnitude-score masks with the provenance the scoring engine records."""
    names = target_names(model)
    params = dict(model.named_parameters())
    scores = {name: params[name].detach().abs() for name in names}
    masks = select_critical(scores, sparsity, group=group, granularity=granularity)
    masks.provenance.update(
        model_identity(model),
        model_fingerprint=model_fingerprint(model, names),
        method="magnitude",
        versions=library_versions(),
    )
    return masks


def random_masks(densities: dict, seed=0, granularity="weight") -> SafetyMasks:
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "model.layers.0.mlp.up_proj.weight": (40, 24),
        "model.layers.0.self_attn.q_proj.weight": (24, 24),
        "model.layers.1.mlp.down_proj.weight": (24, 40),
    }
    masks = {}
    for (name, shape), density in zip(shapes.items(), densities.values()):
        size = shape[:1] if granularity == "neuron" else shape
        masks[name] = torch.rand(size, generator=g) < density
    return SafetyMasks(
        masks, granularity=granularity, shapes=shapes, provenance={"method": "test", "seed": seed}
    )


def masks_equal(a: SafetyMasks, b: SafetyMasks) -> bool:
    return a == b and all(torch.equal(a[n], b[n]) for n in a) and a.provenance == b.provenance


# ---------------------------------------------------------------------------------------------- encode
@pytest.mark.parametrize("granularity", ["weight", "neuron"])
@pytest.mark.parametrize("densities", [(0.01, 0.02, 0.0), (0.5, 0.9, 1.0), (0.02, 0.5, 0.0)])
def test_round_trip_is_exact_for_both_encodings(tmp_path, granularity, densities):
    masks = random_masks(dict(enumerate(densities)), granularity=granularity)
    tensors, header = masks.to_encoded()
    again = SafetyMasks.from_encoded(tensors, json.loads(json.dumps(header)))
    assert masks_equal(masks, again)

    masks.save_pretrained(tmp_path)
    loaded = SafetyMasks.from_pretrained(tmp_path)
    assert masks_equal(masks, loaded) and loaded.granularity == granularity
    assert loaded.names == masks.names  # order kept
    assert masks_equal(SafetyMasks.from_pretrained(tmp_path / MASKS_FILENAME), masks)  # direct file path


def test_encoding_is_the_smaller_one():
    masks = random_masks({0: 0.01, 1: 0.5, 2: 0.0})
    tensors, header = masks.to_encoded()
    encodings = [header["masks"][n]["encoding"] for n in masks.names]
    assert encodings == ["indices", "bitpacked", "indices"]
    first = masks.names[0]
    assert tensors[first].dtype == torch.int32
    assert tensors[first].tolist() == torch.nonzero(masks[first].reshape(-1)).view(-1).tolist()
    assert tensors[masks.names[1]].dtype == torch.uint8 and tensors[masks.names[1]].numel() == 24 * 24 // 8


def test_bit_order_is_little_endian_row_major():
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[0, 0] = mask[0, 3] = mask[1, 7] = True
    mask[1, :4] = True  # dense enough to be bit-packed
    tensors, header = SafetyMasks({"w": mask}).to_encoded()
    assert header["masks"]["w"] == {"shape": [2, 8], "encoding": "bitpacked", "num_locked": 7}
    assert tensors["w"].tolist() == [0b00001001, 0b10001111]


@pytest.mark.parametrize("granularity", ["weight", "neuron"])
def test_file_size_is_bounded(tmp_path, granularity):
    masks = random_masks({0: 0.003, 1: 0.3, 2: 0.06}, granularity=granularity)
    masks.provenance["data"] = {"source": "safety.jsonl", "fingerprint": "f" * 64}
    tensors, header = masks.to_encoded()
    stored = 0
    for name in masks.names:
        n = math.prod(masks.shape(name)) if granularity == "weight" else masks.shape(name)[0]
        k = header["masks"][name]["num_locked"]
        size = tensors[name].numel() * tensors[name].element_size()
        assert size <= min(math.ceil(n / 8), 4 * k)
        stored += size
    masks.save_pretrained(tmp_path)
    file_size = os.path.getsize(tmp_path / MASKS_FILENAME)
    assert stored < file_size <= stored + overhead_bound(masks)


def test_realistic_artifact_overhead(tmp_path):
    # Measured on a tiny Llama with the provenance the scoring engine records: a few KB at most.
    model = tiny_llama()
    masks = masks_for(model)
    masks.save_pretrained(tmp_path)
    tensors, _ = masks.to_encoded()
    stored = sum(t.numel() * t.element_size() for t in tensors.values())
    assert os.path.getsize(tmp_path / MASKS_FILENAME) - stored <= overhead_bound(masks)


# ------------------------------------------------------------------------------------------ save/load
def test_save_is_atomic_and_leaves_no_temp_files(tmp_path):
    masks = random_masks({0: 0.1, 1: 0.2, 2: 0.3})
    out = tmp_path / "nested" / "masks"
    masks.save_pretrained(out)
    masks.save_pretrained(out)  # overwrite in place
    assert sorted(os.listdir(out)) == ["README.md", MASKS_FILENAME]
    assert oct(os.stat(out / MASKS_FILENAME).st_mode & 0o777) != oct(0o600)  # not mkstemp's private mode


def test_failed_save_keeps_the_previous_artifact(tmp_path, monkeypatch):
    old = random_masks({0: 0.1, 1: 0.2, 2: 0.3}, seed=1)
    old.save_pretrained(tmp_path)
    before = (tmp_path / MASKS_FILENAME).read_bytes()

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(masks_module.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        random_masks({0: 0.5, 1: 0.5, 2: 0.5}, seed=2).save_pretrained(tmp_path)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["README.md", MASKS_FILENAME]
    assert (tmp_path / MASKS_FILENAME).read_bytes() == before
    assert masks_equal(SafetyMasks.from_pretrained(tmp_path), old)


def test_provenance_must_be_json(tmp_path):
    masks = random_masks({0: 0.1, 1: 0.2, 2: 0.3})
    masks.provenance["bad"] = torch.ones(1)
    with pytest.raises(ValueError, match="JSON-serializable"):
        masks.save_pretrained(tmp_path)
    assert not os.listdir(tmp_path)


# ---------------------------------------------------------------------------------------- bad files
@pytest.fixture
def saved(tmp_path):
    masks = random_masks({0: 0.02, 1: 0.5, 2: 0.2})
    masks.save_pretrained(tmp_path)
    return tmp_path / MASKS_FILENAME


def rewrite(path, mutate_header=None, mutate_tensors=None, raw_metadata=None):
    """Re-save the file with an edited header/tensors (what a buggy writer or a hand edit would do)."""
    with safe_open(path, framework="pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (not a dict)
        metadata = f.metadata()
    if mutate_tensors:
        mutate_tensors(tensors)
    if raw_metadata is not None:
        metadata = raw_metadata
    elif mutate_header:
        header = json.loads(metadata[HEADER_KEY])
        mutate_header(header, tensors)
        metadata = {HEADER_KEY: json.dumps(header)}
    path.write_bytes(safetensors_save(tensors, metadata=metadata))


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(MaskFileError, match=f"has no {MASKS_FILENAME}: it is not a mask artifact folder"):
        SafetyMasks.from_pretrained(tmp_path)
    with pytest.raises(MaskFileError, match="no such file or folder"):
        SafetyMasks.from_pretrained(str(tmp_path / "nope" / "masks"))


@pytest.mark.parametrize("keep", [0.5, 0.99])
def test_truncated_file(saved, keep):
    data = saved.read_bytes()
    saved.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(
        MaskFileError, match=r"safety_masks.safetensors is not a readable safetensors file \(truncated"
    ):
        SafetyMasks.from_pretrained(saved.parent)


def test_flipped_byte_fails_the_checksum(saved):
    data = bytearray(saved.read_bytes())
    (header_len,) = struct.unpack("<Q", data[:8])
    data[8 + header_len + 1] ^= 0x10  # inside the first mask's bytes
    saved.write_bytes(bytes(data))
    with pytest.raises(
        MaskFileError, match=r"safety_masks.safetensors: checksum mismatch.*corrupt or was edited"
    ):
        SafetyMasks.from_pretrained(saved.parent)


def test_edited_header_fails_the_checksum(saved):
    def lie(header, tensors):
        name = next(iter(header["masks"]))
        header["masks"][name]["num_locked"] += 1

    rewrite(saved, lie)
    with pytest.raises(MaskFileError, match="checksum mismatch"):
        SafetyMasks.from_pretrained(saved)


def test_unknown_format_version(saved):
    rewrite(saved, lambda header, tensors: header.update(format_version=2))
    with pytest.raises(MaskFileError, match=r"unknown mask format version 2.*reads version 1.*upgrade"):
        SafetyMasks.from_pretrained(saved)
    rewrite(saved, lambda header, tensors: header.pop("format_version"))
    with pytest.raises(MaskFileError, match="no format_version"):
        SafetyMasks.from_pretrained(saved)


def test_header_missing_or_not_json(saved):
    rewrite(saved, raw_metadata={"format": "pt"})
    with pytest.raises(MaskFileError, match="no 'safety_peft' header: it is not a safety-peft mask file"):
        SafetyMasks.from_pretrained(saved)
    rewrite(saved, raw_metadata={HEADER_KEY: "{not json"})
    with pytest.raises(MaskFileError, match="header is not valid JSON"):
        SafetyMasks.from_pretrained(saved)


def test_decoded_size_must_match_shape(saved):
    names = SafetyMasks.from_pretrained(saved).names

    def grow(header, tensors):  # bit-packed mask claims a bigger shape, checksum recomputed
        header["masks"][names[1]]["shape"] = [24, 25]
        header["checksum"] = masks_module._checksum(tensors, header["masks"], header["provenance"])

    rewrite(saved, grow)
    with pytest.raises(
        MaskFileError, match=r"q_proj.weight' holds 72 packed bytes, but its shape \[24, 25\] needs 75"
    ):
        SafetyMasks.from_pretrained(saved)


def test_indices_must_lie_inside_the_shape(saved):
    names = SafetyMasks.from_pretrained(saved).names

    def shrink(header, tensors):  # index-encoded mask claims a smaller shape than its indices reach
        entry = header["masks"][names[0]]
        assert entry["encoding"] == "indices"
        entry["shape"] = [entry["num_locked"], 1]
        header["checksum"] = masks_module._checksum(tensors, header["masks"], header["provenance"])

    rewrite(saved, shrink)
    with pytest.raises(
        MaskFileError, match="up_proj.weight' has indices that are unsorted, repeated or outside its shape"
    ):
        SafetyMasks.from_pretrained(saved)


def test_stored_tensor_missing_from_header(saved):
    rewrite(saved, mutate_tensors=lambda tensors: tensors.update(extra=torch.zeros(1, dtype=torch.uint8)))
    with pytest.raises(MaskFileError, match="stored tensors missing from the header: 'extra'"):
        SafetyMasks.from_pretrained(saved)


# ------------------------------------------------------------------------------------------- validate
def test_validate_accepts_the_right_model_and_its_bf16_copy(tmp_path):
    model = tiny_llama()
    masks = masks_for(model)
    masks.save_pretrained(tmp_path)
    loaded = SafetyMasks.from_pretrained(tmp_path, model=model)
    assert masks_equal(loaded, masks)
    assert loaded.provenance["model_fingerprint"].startswith("sha256:")
    SafetyMasks.from_pretrained(tmp_path, model=tiny_llama().to(torch.bfloat16))


def test_validate_refuses_missing_names(tmp_path):
    masks_for(tiny_llama(layers=2)).save_pretrained(tmp_path)
    with pytest.raises(
        MaskMismatchError,
        match=r"7 of 14 masked weights are not parameters of this model: "
        r"'model.layers.1.self_attn.q_proj.weight'",
    ):
        SafetyMasks.from_pretrained(tmp_path, model=tiny_llama(layers=1))


def test_validate_refuses_other_shapes(tmp_path):
    masks_for(tiny_llama(intermediate=64)).save_pretrained(tmp_path)
    with pytest.raises(
        MaskMismatchError,
        match=r"shape of 'model.layers.0.mlp.gate_proj.weight' is \(64, 32\) "
        r"in the masks but \(48, 32\) in the model \(5 more weights differ\)",
    ):
        SafetyMasks.from_pretrained(tmp_path, model=tiny_llama(intermediate=48))


def test_validate_refuses_non_matrix_targets():
    model = tiny_llama()
    masks = SafetyMasks({"model.norm.weight": torch.zeros(32, dtype=torch.bool)})
    with pytest.raises(
        MaskMismatchError, match=r"must be 2-D weight matrices, but 'model.norm.weight' has shape \(32,\)"
    ):
        masks.validate(model)


def test_validate_refuses_other_weights_unless_told(tmp_path):
    model = tiny_llama(seed=0)
    masks = masks_for(model)
    masks.provenance["base_model"] = "org/aligned-model"
    masks.save_pretrained(tmp_path)
    other = tiny_llama(seed=1)
    with pytest.raises(
        MaskMismatchError,
        match=r"weights fingerprint differs: these masks were computed on "
        r"org/aligned-model.*pass check_fingerprint=False",
    ):
        SafetyMasks.from_pretrained(tmp_path, model=other)
    SafetyMasks.from_pretrained(tmp_path, model=other, check_fingerprint=False)

    with torch.no_grad():  # a small fine-tuning step changes the fingerprint too
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 1e-3)
    with pytest.raises(MaskMismatchError, match="weights fingerprint differs"):
        masks.validate(model)
    masks.validate(model, check_fingerprint=False)


def test_validate_sees_through_a_peft_wrapper():
    peft = pytest.importorskip("peft")
    model = tiny_llama()
    masks = masks_for(model)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(target_modules=["q_proj", "down_proj"], r=2))
    masks.validate(wrapped)  # names resolved by suffix, base_layer weights fingerprinted
    assert model_fingerprint(wrapped, masks.names) == masks.provenance["model_fingerprint"]


# ----------------------------------------------------------------------------------------- provenance
def test_model_fingerprint_properties():
    model = tiny_llama()
    names = target_names(model)
    fp = model_fingerprint(model, names)
    assert fp == model_fingerprint(model, list(reversed(names)))  # order-independent
    assert fp == model_fingerprint(tiny_llama(), names)  # deterministic
    assert fp != model_fingerprint(model, names[:-1])
    assert fp != model_fingerprint(tiny_llama(seed=3), names)
    with pytest.raises(MaskMismatchError, match="no parameter named 'model.layers.9.mlp.up_proj.weight'"):
        model_fingerprint(model, ["model.layers.9.mlp.up_proj.weight"])


def test_identity_and_versions():
    model = tiny_llama()
    assert model_identity(model) == {"base_model": None, "revision": None}
    model.config._name_or_path = "org/model"
    assert model_identity(model)["base_model"] == "org/model"
    versions = library_versions()
    assert set(versions) == {"torch", "transformers", "peft", "trl", "safetensors", "safety_peft"}
    assert versions["torch"] == torch.__version__


# ------------------------------------------------------------------------------------- access & stats
def test_statistics_and_access_for_neuron_masks():
    rows = torch.tensor([True, False, True, False])
    masks = SafetyMasks(
        {"w": rows, "v": torch.zeros(2, dtype=torch.bool)},
        granularity="neuron",
        shapes={"w": (4, 5), "v": (2, 3)},
        provenance={"base_model": "org/m"},
    )
    assert masks.num_locked == 10 and masks.num_entries == 26 and masks.density == pytest.approx(10 / 26)
    assert masks.layer_stats() == [
        {"name": "w", "shape": (4, 5), "locked": 10, "total": 20, "density": 0.5},
        {"name": "v", "shape": (2, 3), "locked": 0, "total": 6, "density": 0.0},
    ]
    full = masks["w"]
    assert full.shape == (4, 5) and full.stride() == (1, 0)  # zero-copy view of the row mask
    assert torch.equal(full, rows[:, None].expand(4, 5)) and masks.mask("w") is not None
    assert masks.row_mask("w") is rows or torch.equal(masks.row_mask("w"), rows)
    assert list(masks) == ["w", "v"] and len(masks) == 2 and "w" in masks and "x" not in masks
    assert [name for name, _ in masks.items()] == ["w", "v"]
    assert masks.shape("w") == torch.Size([4, 5])
    assert repr(masks) == (
        "SafetyMasks(2 weights, granularity='neuron', 10 of 26 entries locked (38.46%), base_model='org/m')"
    )
    moved = masks.to("cpu")
    assert moved == masks and moved.provenance == masks.provenance and moved is not masks
    with pytest.raises(KeyError, match="no mask for 'x'"):
        masks["x"]


def test_weight_masks_have_no_row_mask_and_constructor_checks():
    masks = SafetyMasks({"w": torch.eye(3, dtype=torch.bool)})
    assert masks.num_locked == 3 and masks.density == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="row_mask\\(\\) needs neuron granularity"):
        masks.row_mask("w")
    with pytest.raises(TypeError, match="must be a bool tensor"):
        SafetyMasks({"w": torch.ones(2, 2)})
    with pytest.raises(ValueError, match="need shapes\\['w'\\]"):
        SafetyMasks({"w": torch.ones(2, dtype=torch.bool)}, granularity="neuron")
    with pytest.raises(ValueError, match="one entry per output row"):
        SafetyMasks({"w": torch.ones(3, dtype=torch.bool)}, granularity="neuron", shapes={"w": (2, 4)})
    with pytest.raises(ValueError, match="granularity must be"):
        SafetyMasks({}, granularity="column")
    assert SafetyMasks({}).density == 0.0


# ----------------------------------------------------------------------------------- card and the hub
def test_model_card(tmp_path):
    model = tiny_llama()
    masks = masks_for(model, granularity="neuron", group="global")
    masks.provenance.update(
        base_model="org/aligned-model", nsamples=16, data={"source": "s.jsonl", "fingerprint": "ab"}
    )
    masks.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    front = card.split("---")[1]
    assert "library_name: safety-peft" in front and "- safety-peft" in front and "- masks" in front
    assert "base_model: org/aligned-model" in front
    assert f'SafetyMasks.from_pretrained("{tmp_path}"' in card and "SafetyFreezeConfig(masks=masks)" in card
    assert "| Calibration samples | `16` |" in card and "`s.jsonl` (fingerprint `ab`)" in card
    assert "| Granularity | `neuron` |" in card and "| Comparison group | `global` |" in card
    for stat in masks.layer_stats():
        assert f"| `{stat['name']}` | {stat['shape'][0]}x{stat['shape'][1]} | {stat['locked']:,} |" in card

    masks.provenance["base_model"] = str(tmp_path)  # a local path is no Hub id: keep it out of the metadata
    assert "base_model:" not in render_model_card(masks).split("---")[1]


def test_from_pretrained_downloads_repo_ids(tmp_path, monkeypatch):
    masks = random_masks({0: 0.1, 1: 0.2, 2: 0.3})
    masks.save_pretrained(tmp_path)
    calls = []

    def download_artifact_file(repo_id, filename, **kwargs):
        calls.append((repo_id, filename, kwargs))
        return str(tmp_path / filename)

    fake = types.ModuleType("safety_peft.hub")
    fake.download_artifact_file = download_artifact_file
    monkeypatch.setitem(sys.modules, "safety_peft.hub", fake)
    loaded = SafetyMasks.from_pretrained("org/masks", revision="v1", token="t", local_files_only=True)
    assert masks_equal(loaded, masks)
    assert calls == [
        (
            "org/masks",
            MASKS_FILENAME,
            {"revision": "v1", "token": "t", "cache_dir": None, "local_files_only": True},
        )
    ]


def test_push_to_hub_uploads_masks_and_card(monkeypatch):
    masks = random_masks({0: 0.1, 1: 0.2, 2: 0.3})
    seen = {}

    def upload_artifact_folder(folder, repo_id, **kwargs):
        seen.update(
            files=sorted(os.listdir(folder)),
            repo_id=repo_id,
            kwargs=kwargs,
            card=Path(folder, "README.md").read_text(),
            masks=SafetyMasks.from_pretrained(folder),
        )
        return "https://hub.example/org/masks/commit/abc"

    fake = types.ModuleType("safety_peft.hub")
    fake.upload_artifact_folder = upload_artifact_folder
    monkeypatch.setitem(sys.modules, "safety_peft.hub", fake)
    url = masks.push_to_hub("org/masks", private=True, token="t")
    assert url == "https://hub.example/org/masks/commit/abc"
    assert seen["files"] == ["README.md", MASKS_FILENAME] and seen["repo_id"] == "org/masks"
    assert seen["kwargs"]["private"] is True and seen["kwargs"]["token"] == "t"
    assert 'SafetyMasks.from_pretrained("org/masks"' in seen["card"]
    assert masks_equal(seen["masks"], masks)
