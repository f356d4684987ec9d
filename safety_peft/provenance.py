"""Provenance: which model, which weights and which library versions a mask artifact came from.

A mask is only meaningful on the weights it was computed on. The fingerprint lets
:meth:`SafetyMasks.validate` refuse masks made for another model before they silently lock the wrong
entries, while staying cheap enough to compute on every load.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from importlib import metadata

import torch
from torch import nn

from safety_peft.errors import MaskMismatchError

__all__ = ["find_parameter", "library_versions", "model_fingerprint", "model_identity"]

FINGERPRINT_SAMPLES = 4096  # values read per weight: enough to tell checkpoints apart, fast on any size
_WRAPPER_SEGMENTS = ("base_layer.",)  # inserted by PEFT tuner layers between a module and its weight


def _strip_wrapper_segments(name: str) -> str:
    for segment in _WRAPPER_SEGMENTS:
        name = name.replace("." + segment, ".")
    return name


def find_parameter(model: nn.Module, name: str) -> nn.Parameter | None:
    """The parameter called ``name`` in ``model``, or ``None``.

    ``name`` is a plain transformers parameter name (``model.layers.0.self_attn.q_proj.weight``).
    When the exact name is missing (the model is wrapped, e.g. by PEFT, which prefixes
    ``base_model.model.`` and moves the frozen weight to ``<module>.base_layer.weight``), the unique
    parameter whose name, with ``base_layer.`` segments removed, ends with ``"." + name`` is used.
    Several such parameters are ambiguous and give ``None``.
    """
    return _lookup(dict(model.named_parameters(remove_duplicate=False)), name)


def _lookup(params: dict[str, nn.Parameter], name: str) -> nn.Parameter | None:
    if name in params:
        return params[name]
    suffix = "." + name
    # A tuner layer without PEFT's prefix (add_adapter) only moves the weight to `base_layer.weight`.
    matches = [p for n, p in params.items()
               if (stripped := _strip_wrapper_segments(n)) == name or stripped.endswith(suffix)]
    return matches[0] if len(matches) == 1 else None


def _sample_bytes(weight: torch.Tensor) -> bytes:
    """Evenly strided values cast to bfloat16, as little-endian int16 bytes.

    Casting to bfloat16 makes an fp32 load and a bf16 load of the same checkpoint agree, while any
    real change of weights (fine-tuning, another checkpoint) flips many sampled values.
    """
    flat = weight.detach().reshape(-1)
    n = flat.numel()
    m = min(FINGERPRINT_SAMPLES, n)
    index = torch.div(torch.arange(m, dtype=torch.int64) * n, m, rounding_mode="floor").to(flat.device)
    sample = flat[index].to(torch.bfloat16).view(torch.int16).cpu().numpy()
    return sample.astype("<i2", copy=False).tobytes()


def model_fingerprint(model: nn.Module, names: Iterable[str]) -> str:
    """A sha256 fingerprint of the named weights' shapes and (subsampled) values.

    The names are sorted first, so their order does not matter. Each contributes its name, its shape
    and up to 4096 evenly strided values rounded to bfloat16. Parameters are looked up as in
    :func:`find_parameter` (so a PEFT-wrapped model fingerprints like the model it wraps); a name the
    model lacks raises :class:`MaskMismatchError`.
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    digest = hashlib.sha256(b"safety-peft-fingerprint-v1\0")
    missing = []
    for name in sorted(set(names)):
        weight = _lookup(params, name)
        if weight is None:
            missing.append(name)
            continue
        digest.update(name.encode() + b"\0")
        digest.update(repr(tuple(weight.shape)).encode() + b"\0")
        digest.update(_sample_bytes(weight))
    if missing:
        shown = ", ".join(repr(n) for n in missing[:3])
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise MaskMismatchError(f"the model has no parameter named {shown}{more}")
    return "sha256:" + digest.hexdigest()


def library_versions() -> dict[str, str | None]:
    """Installed versions of the libraries that shape scores and masks (``None`` if not installed)."""
    distributions = {
        "torch": "torch",
        "transformers": "transformers",
        "peft": "peft",
        "trl": "trl",
        "safetensors": "safetensors",
        "safety_peft": "safety-peft",
    }
    versions: dict[str, str | None] = {}
    for key, dist in distributions.items():
        try:
            versions[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[key] = None
    versions["torch"] = torch.__version__  # the running build (e.g. "2.13.0+cpu"), not just the dist
    if versions["safety_peft"] is None:  # running from a source checkout
        try:
            import safety_peft

            versions["safety_peft"] = getattr(safety_peft, "__version__", None)
        except ImportError:  # pragma: no cover
            pass
    return versions


def model_identity(model: nn.Module) -> dict[str, str | None]:
    """The model's name or path and Hub revision, as transformers recorded them at load time."""
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", None) or None
    revision = getattr(config, "_commit_hash", None) or None
    return {"base_model": name, "revision": revision}
