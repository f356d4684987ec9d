"""`SafetyScores`: float32 importance scores keyed by parameter name, with the provenance to reproduce them."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from safetensors import safe_open

from ..atomic import atomic_path
from ..errors import MaskFileError

_METADATA_KEY = "safety_peft_scores"
SCORES_FILENAME = "safety_scores.safetensors"


class SafetyScores(Mapping):
    """A read-only mapping ``parameter name -> float32 CPU tensor`` of the weight's shape."""

    def __init__(self, scores: Mapping[str, torch.Tensor], provenance: Mapping[str, Any] | None = None):
        self._scores = {name: t.detach().to("cpu", torch.float32) for name, t in scores.items()}
        self.provenance: dict[str, Any] = dict(provenance or {})

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._scores[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._scores)

    def __len__(self) -> int:
        return len(self._scores)

    @property
    def method(self) -> str | None:
        return self.provenance.get("method")

    def __repr__(self) -> str:
        n = sum(t.numel() for t in self._scores.values())
        return f"SafetyScores(method={self.method!r}, weights={len(self)}, entries={n:,})"

    def save(self, path: str | os.PathLike) -> str:
        """Write a safetensors file (a folder gets ``safety_scores.safetensors``), atomically."""
        path = os.fspath(path)
        if os.path.isdir(path) or path.endswith(os.sep):
            os.makedirs(path, exist_ok=True)
            path = os.path.join(path, SCORES_FILENAME)
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        tensors = {name: t.contiguous() for name, t in self._scores.items()}
        with atomic_path(path) as tmp:
            save_file(tensors, tmp, metadata={_METADATA_KEY: json.dumps({"provenance": self.provenance})})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SafetyScores":
        """Read scores written by :meth:`save`; a damaged file raises :class:`MaskFileError`."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, SCORES_FILENAME)
        if not os.path.isfile(path):
            raise MaskFileError(f"{path}: no scores file there.")
        try:
            with safe_open(path, framework="pt") as fh:
                metadata = fh.metadata() or {}
            tensors = load_file(path)
        except (SafetensorError, OSError, ValueError) as exc:
            raise MaskFileError(f"{path}: not a readable safetensors file (truncated or corrupt?): {exc}") from exc
        try:
            provenance = json.loads(metadata[_METADATA_KEY])["provenance"]
        except (KeyError, json.JSONDecodeError, TypeError) as exc:
            raise MaskFileError(f"{path}: safetensors file without safety-peft scores metadata.") from exc
        return cls(tensors, provenance)
