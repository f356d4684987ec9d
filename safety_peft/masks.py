"""The mask artifact: which entries of which weights are locked, and where the masks came from.

A mask artifact is a folder (local or a Hub repo) holding ``safety_masks.safetensors`` and a model card
``README.md``; nothing in it needs pickle.

File format (``format_version`` 1)
    Tensors are keyed by parameter name (``model.layers.0.self_attn.q_proj.weight``). Each mask is stored
    in the smaller of two encodings of its flattened (row-major) boolean mask, so a mask of ``n`` entries
    with ``k`` locked costs at most ``min(ceil(n / 8), 4 k)`` bytes:

    - ``bitpacked``: uint8, ``numpy.packbits(mask, bitorder="little")`` (entry ``i`` is bit ``i % 8`` of
      byte ``i // 8``);
    - ``indices``: int32, the sorted flat indices of the locked entries.

    With neuron granularity the encoded mask is the 1-D row mask (``shape[0]`` entries). The safetensors
    metadata holds one JSON document under the key ``"safety_peft"``::

        {"format_version": 1, "granularity": "weight" | "neuron",
         "masks": {name: {"shape": [out, in], "encoding": "bitpacked" | "indices",
                          "num_locked": k}},           # k counts encoded entries (rows for neuron)
         "checksum": "sha256:...",                     # over provenance, entries and bytes
         "provenance": {...}}                           # base model, fingerprint, method, data, p, q, ...

    :meth:`SafetyMasks.to_encoded` / :meth:`SafetyMasks.from_encoded` produce and read exactly this
    pair, so adapter files can embed the same encoding.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterator, Mapping
from enum import Enum
from typing import Any, Literal

import numpy as np
import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_save
from torch import Tensor, nn

from safety_peft.atomic import atomic_write
from safety_peft.errors import MaskFileError, MaskMismatchError
from safety_peft.hub import looks_like_repo_id
from safety_peft.provenance import _lookup, model_fingerprint

__all__ = [
    "FORMAT_VERSION",
    "HEADER_KEY",
    "MASKS_FILENAME",
    "MODEL_CARD_FILENAME",
    "Granularity",
    "MaskEncoding",
    "SafetyMasks",
    "render_model_card",
]

FORMAT_VERSION = 1
HEADER_KEY = "safety_peft"
MASKS_FILENAME = "safety_masks.safetensors"
MODEL_CARD_FILENAME = "README.md"
_MAX_INDEX = 2**31 - 1  # int32 indices address at most this many entries


class Granularity(str, Enum):
    """What one mask entry locks: a single weight entry or a whole output row (neuron)."""

    WEIGHT = "weight"
    NEURON = "neuron"


class MaskEncoding(str, Enum):
    """How a mask is stored in the file (the smaller of the two is chosen per mask)."""

    BITPACKED = "bitpacked"
    INDICES = "indices"


def _few(items: list[str], limit: int = 3) -> str:
    shown = ", ".join(repr(n) for n in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _tensor_bytes(tensor: Tensor) -> bytes:
    # Raw little-endian bytes (every platform torch supports is little-endian), whatever the dtype.
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _checksum(
    tensors: Mapping[str, Tensor], entries: Mapping[str, Mapping[str, Any]], provenance: Mapping[str, Any]
) -> str:
    """sha256 over the provenance, then, for each name in sorted order, its header entry and bytes.

    Covering the entries (shape, encoding, count) and the provenance as well as the bytes means a
    header edit is caught too: a changed shape would decode the same bytes differently, and a changed
    ``model_fingerprint`` would let the masks onto another model.
    """
    digest = hashlib.sha256(b"safety-peft-masks-v1\0")
    digest.update(_canonical_json(provenance).encode() + b"\0")
    for name in sorted(entries):
        tensor = tensors[name]
        digest.update(name.encode() + b"\0")
        digest.update(_canonical_json(entries[name]).encode() + b"\0")
        digest.update(str(tensor.dtype).encode() + b"\0")
        digest.update(_tensor_bytes(tensor))
    return "sha256:" + digest.hexdigest()


def _encode(flat: Tensor) -> tuple[Tensor, MaskEncoding, int]:
    flat = flat.detach().reshape(-1).cpu()
    n, k = flat.numel(), int(flat.sum())
    if 4 * k < math.ceil(n / 8) and n <= _MAX_INDEX:
        return torch.nonzero(flat).view(-1).to(torch.int32), MaskEncoding.INDICES, k
    packed = np.packbits(flat.numpy(), bitorder="little")
    return torch.from_numpy(packed), MaskEncoding.BITPACKED, k


def _decode(name: str, tensor: Tensor, entry: Mapping[str, Any], n: int, fail) -> Tensor:
    encoding, k = entry.get("encoding"), entry.get("num_locked")
    if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= n:
        fail(f"mask {name!r} has a bad num_locked {k!r} (it has {n} entries)")
    if tensor.dim() != 1:
        fail(f"mask {name!r} is stored with shape {tuple(tensor.shape)}; encoded masks are 1-D")
    if encoding == MaskEncoding.BITPACKED.value:
        if tensor.dtype != torch.uint8:
            fail(f"bit-packed mask {name!r} must be uint8, found {tensor.dtype}")
        if tensor.numel() != math.ceil(n / 8):
            fail(
                f"mask {name!r} holds {tensor.numel()} packed bytes, but its shape {entry['shape']} "
                f"needs {math.ceil(n / 8)} ({n} entries)"
            )
        bits = np.unpackbits(tensor.numpy(), count=n, bitorder="little").astype(bool)
        mask = torch.from_numpy(bits)
        if int(mask.sum()) != k:
            fail(f"mask {name!r} decodes to {int(mask.sum())} locked entries, but the header says {k}")
        return mask
    if encoding == MaskEncoding.INDICES.value:
        if tensor.dtype != torch.int32:
            fail(f"index-encoded mask {name!r} must be int32, found {tensor.dtype}")
        if tensor.numel() != k:
            fail(f"mask {name!r} holds {tensor.numel()} indices, but the header says {k} locked entries")
        index = tensor.to(torch.int64)
        if k and (int(index[0]) < 0 or int(index[-1]) >= n or bool((index[1:] <= index[:-1]).any())):
            fail(
                f"mask {name!r} has indices that are unsorted, repeated or outside its shape {entry['shape']}"
            )
        mask = torch.zeros(n, dtype=torch.bool)
        mask[index] = True
        return mask
    choices = ", ".join(repr(e.value) for e in MaskEncoding)
    fail(f"mask {name!r} has an unknown encoding {encoding!r} (expected {choices})")
    raise AssertionError  # unreachable: fail() raises




class SafetyMasks:
    """Lock masks for a model's target weights (``True`` = locked), with their provenance.

    ``masks`` maps parameter names to bool tensors: the weight's full shape for ``"weight"``
    granularity; the 1-D ``(out_features,)`` row mask for ``"neuron"`` granularity, where ``shapes``
    must give each full weight shape. Indexing always returns a full-shape mask (for neurons a
    zero-copy expanded view), so consumers need not care about granularity.
    """

    def __init__(
        self,
        masks: Mapping[str, Tensor],
        *,
        granularity: Granularity | Literal["weight", "neuron"] = "weight",
        shapes: Mapping[str, tuple[int, ...]] | None = None,
        provenance: Mapping[str, Any] | None = None,
    ) -> None:
        try:
            self._granularity = Granularity(granularity)
        except ValueError:
            raise ValueError(f"granularity must be 'weight' or 'neuron', got {granularity!r}") from None
        shapes = dict(shapes or {})
        unknown = [name for name in shapes if name not in masks]
        if unknown:
            raise ValueError(f"shapes given for names that have no mask: {_few(unknown)}")
        self._masks: dict[str, Tensor] = {}
        self._shapes: dict[str, torch.Size] = {}
        for name, mask in masks.items():
            if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
                kind = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
                raise TypeError(f"mask {name!r} must be a bool tensor, got {kind}")
            shape = shapes.get(name)
            if self._granularity is Granularity.WEIGHT:
                if shape is not None and tuple(shape) != tuple(mask.shape):
                    raise ValueError(
                        f"mask {name!r} has shape {tuple(mask.shape)} but shapes[{name!r}] is {tuple(shape)}"
                    )
                shape = mask.shape
            else:
                if shape is None:
                    raise ValueError(f"neuron masks need shapes[{name!r}], the full weight shape")
                if len(shape) != 2 or mask.dim() != 1 or mask.numel() != shape[0]:
                    raise ValueError(
                        f"neuron mask {name!r} must be 1-D with one entry per output row of its "
                        f"(out, in) weight; got mask shape {tuple(mask.shape)} for weight shape "
                        f"{tuple(shape)}"
                    )
            self._masks[name] = mask.detach()
            self._shapes[name] = torch.Size(shape)
        self.provenance: dict[str, Any] = copy.deepcopy(dict(provenance or {}))

    # ----------------------------------------------------------------------------------------- access
    @property
    def granularity(self) -> Granularity:
        return self._granularity

    @property
    def names(self) -> list[str]:
        return list(self._masks)

    def keys(self) -> list[str]:
        return self.names

    def __iter__(self) -> Iterator[str]:
        return iter(self._masks)

    def __len__(self) -> int:
        return len(self._masks)

    def __contains__(self, name: object) -> bool:
        return name in self._masks

    def _check_name(self, name: str) -> None:
        if name not in self._masks:
            raise KeyError(f"no mask for {name!r}; masked weights: {_few(self.names)}")

    def mask(self, name: str) -> Tensor:
        """The full-shape bool mask of ``name`` (neuron granularity: an expanded view, no copy)."""
        self._check_name(name)
        mask = self._masks[name]
        if self._granularity is Granularity.NEURON:
            return mask[:, None].expand(self._shapes[name])
        return mask

    __getitem__ = mask

    def items(self) -> Iterator[tuple[str, Tensor]]:
        return ((name, self.mask(name)) for name in self._masks)

    def row_mask(self, name: str) -> Tensor:
        """The ``(out_features,)`` mask of locked rows; only neuron masks have one."""
        self._check_name(name)
        if self._granularity is not Granularity.NEURON:
            raise ValueError(
                "row_mask() needs neuron granularity; these masks lock single entries (use mask(name))"
            )
        return self._masks[name]

    def shape(self, name: str) -> torch.Size:
        self._check_name(name)
        return self._shapes[name]

    # ------------------------------------------------------------------------------------ statistics
    def _locked(self, name: str) -> int:
        locked = int(self._masks[name].sum())
        if self._granularity is Granularity.NEURON:
            locked *= self._shapes[name][1]
        return locked

    @property
    def num_locked(self) -> int:
        return sum(self._locked(name) for name in self._masks)

    @property
    def num_entries(self) -> int:
        return sum(math.prod(shape) for shape in self._shapes.values())

    @property
    def density(self) -> float:
        """Fraction of the masked weights' entries that are locked."""
        total = self.num_entries
        return self.num_locked / total if total else 0.0

    def layer_stats(self) -> list[dict[str, Any]]:
        stats = []
        for name in self._masks:
            locked, total = self._locked(name), math.prod(self._shapes[name])
            stats.append(
                {
                    "name": name,
                    "shape": tuple(self._shapes[name]),
                    "locked": locked,
                    "total": total,
                    "density": locked / total if total else 0.0,
                }
            )
        return stats

    def to(self, device: torch.device | str) -> SafetyMasks:
        masks = {name: mask.to(device) for name, mask in self._masks.items()}
        return SafetyMasks(
            masks, granularity=self._granularity, shapes=self._shapes, provenance=self.provenance
        )

    def __repr__(self) -> str:
        base = self.provenance.get("base_model")
        where = f", base_model={base!r}" if base else ""
        return (
            f"SafetyMasks({len(self)} weights, granularity={self._granularity.value!r}, "
            f"{self.num_locked:,} of {self.num_entries:,} entries locked ({self.density:.2%}){where})"
        )

    def __eq__(self, other: object) -> bool:
        """Same granularity, names (in order), shapes and locked entries; provenance is not compared."""
        if not isinstance(other, SafetyMasks):
            return NotImplemented
        return (
            self._granularity is other._granularity
            and self.names == other.names
            and self._shapes == other._shapes
            and all(torch.equal(self._masks[n].cpu(), other._masks[n].cpu()) for n in self._masks)
        )

    __hash__ = None  # mutable contents

    # -------------------------------------------------------------------------------------- encoding
    def to_encoded(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """The compact tensors and the JSON-able header of the file format (see the module docstring)."""
        tensors: dict[str, Tensor] = {}
        entries: dict[str, dict[str, Any]] = {}
        for name, mask in self._masks.items():
            encoded, encoding, locked = _encode(mask)
            tensors[name] = encoded
            entries[name] = {
                "shape": list(self._shapes[name]),
                "encoding": encoding.value,
                "num_locked": locked,
            }
        try:
            provenance = json.loads(json.dumps(self.provenance))
        except (TypeError, ValueError) as err:
            raise ValueError(f"mask provenance must be JSON-serializable: {err}") from None
        header = {
            "format_version": FORMAT_VERSION,
            "granularity": self._granularity.value,
            "masks": entries,
            "checksum": _checksum(tensors, entries, provenance),
            "provenance": provenance,
        }
        return tensors, header

    @classmethod
    def from_encoded(
        cls, tensors: Mapping[str, Tensor], header: Mapping[str, Any], *, source: str | None = None
    ) -> SafetyMasks:
        """Inverse of :meth:`to_encoded`; checks version, checksum and every mask's size.

        ``source`` (a file name) prefixes error messages. Tensors not listed in the header are ignored,
        so a file that embeds masks among other tensors can pass them all.
        """

        def fail(message: str) -> None:
            raise MaskFileError(f"{source}: {message}" if source else message)

        if not isinstance(header, Mapping):
            fail(f"the mask header must be a JSON object, found {type(header).__name__}")
        version = header.get("format_version")
        if version is None:
            fail("the mask header has no format_version")
        if version != FORMAT_VERSION:
            fail(
                f"unknown mask format version {version!r}; this safety-peft reads version {FORMAT_VERSION} "
                "(a newer safety-peft probably wrote it: upgrade safety-peft)"
            )
        try:
            granularity = Granularity(header.get("granularity"))
        except ValueError:
            fail(f"unknown granularity {header.get('granularity')!r} in the mask header")
        entries = header.get("masks")
        if not isinstance(entries, Mapping):
            fail("the mask header has no 'masks' table")
        missing = [name for name in entries if name not in tensors]
        if missing:
            fail(f"the header lists masks with no stored tensor: {_few(missing)}")
        for name, entry in entries.items():
            shape = entry.get("shape") if isinstance(entry, Mapping) else None
            if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
                fail(f"mask {name!r} has a bad shape {shape!r} in the header")
            if granularity is Granularity.NEURON and len(shape) != 2:
                fail(f"neuron mask {name!r} must describe a 2-D weight, got shape {shape}")
        provenance = header.get("provenance", {})
        if not isinstance(provenance, Mapping):
            fail("the mask provenance must be a JSON object")
        checksum = header.get("checksum")
        actual = _checksum(tensors, entries, provenance)
        if checksum != actual:
            fail(
                f"checksum mismatch (header {checksum!r}, contents {actual!r}): the file is corrupt or "
                "was edited"
            )

        masks, shapes = {}, {}
        for name, entry in entries.items():
            shape = tuple(entry["shape"])
            n = shape[0] if granularity is Granularity.NEURON else math.prod(shape)
            flat = _decode(name, tensors[name].cpu(), entry, n, fail)
            masks[name] = flat if granularity is Granularity.NEURON else flat.view(shape)
            shapes[name] = shape
        return cls(masks, granularity=granularity, shapes=shapes, provenance=provenance)

    # ------------------------------------------------------------------------------------------ files
    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write ``safety_masks.safetensors`` and a model card ``README.md`` into ``directory``.

        Each file is written to a temporary file in the same folder and moved into place, so an
        interrupted save leaves the previous artifact intact.
        """
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        tensors, header = self.to_encoded()
        data = safetensors_save(tensors, metadata={HEADER_KEY: json.dumps(header)})
        atomic_write(os.path.join(directory, MASKS_FILENAME), data)
        card = render_model_card(self, location=directory)
        atomic_write(os.path.join(directory, MODEL_CARD_FILENAME), card.encode())

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike,
        *,
        model: nn.Module | None = None,
        revision: str | None = None,
        check_fingerprint: bool = True,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
    ) -> SafetyMasks:
        """Load masks from a local folder, a ``.safetensors`` file, or a Hub repo id.

        A local folder or file is read directly (``revision`` and the Hub arguments are then unused);
        anything else that looks like a repo id is downloaded. Given ``model``, the masks are checked
        against it (:meth:`validate`) so masks made for another model are refused before use.
        """
        location = os.fspath(path_or_repo_id)
        if os.path.isdir(location):
            path = os.path.join(location, MASKS_FILENAME)
            if not os.path.isfile(path):
                raise MaskFileError(
                    f"{location} has no {MASKS_FILENAME}: it is not a mask artifact folder "
                    "(write one with SafetyMasks.save_pretrained or `safety-peft score --out`)"
                )
        elif os.path.isfile(location):
            path = location
        elif looks_like_repo_id(location):
            from safety_peft.hub import download_artifact_file

            path = download_artifact_file(
                location,
                MASKS_FILENAME,
                revision=revision,
                token=token,
                cache_dir=cache_dir,
                local_files_only=local_files_only,
            )
        else:
            raise MaskFileError(f"{location}: no such file or folder (and not a Hub repo id)")
        masks = cls._read_file(os.fspath(path))
        if model is not None:
            masks.validate(model, check_fingerprint=check_fingerprint)
        return masks

    @classmethod
    def _read_file(cls, path: str) -> SafetyMasks:
        try:
            with safe_open(path, framework="pt") as f:
                metadata = f.metadata() or {}
                tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (not a dict)
        except FileNotFoundError:
            raise MaskFileError(f"{path}: no such file") from None
        except (SafetensorError, OSError) as err:
            raise MaskFileError(
                f"{path} is not a readable safetensors file (truncated or corrupt?): {err}"
            ) from None
        raw = metadata.get(HEADER_KEY)
        if raw is None:
            raise MaskFileError(
                f"{path} has no {HEADER_KEY!r} header: it is not a safety-peft mask file "
                "(is it a scores file or an adapter?)"
            )
        try:
            header = json.loads(raw)
        except json.JSONDecodeError as err:
            raise MaskFileError(f"{path}: the {HEADER_KEY!r} header is not valid JSON ({err})") from None
        masks = cls.from_encoded(tensors, header, source=path)
        extra = [name for name in tensors if name not in masks]
        if extra:
            raise MaskFileError(f"{path}: stored tensors missing from the header: {_few(extra)}")
        return masks

    def validate(self, model: nn.Module, *, check_fingerprint: bool = True) -> None:
        """Refuse a model these masks were not made for (names, shapes, then weight fingerprint).

        The fingerprint check compares the model's current weights with the ones the scores were
        computed on; fine-tuned weights differ by design, hence ``check_fingerprint=False``.
        """
        params = dict(model.named_parameters(remove_duplicate=False))
        base = self.provenance.get("base_model") or "another model"
        missing, not_matrix, wrong_shape = [], [], []
        for name in self._masks:
            param = _lookup(params, name)
            if param is None:
                missing.append(name)
            elif param.dim() != 2:
                not_matrix.append(f"{name!r} has shape {tuple(param.shape)}")
            elif tuple(param.shape) != tuple(self._shapes[name]):
                wrong_shape.append(
                    f"shape of {name!r} is {tuple(self._shapes[name])} in the masks but {tuple(param.shape)} "
                    "in the model"
                )
        if missing:
            raise MaskMismatchError(
                f"{len(missing)} of {len(self)} masked weights are not parameters of this model: "
                f"{_few(missing)} (these masks were computed on {base})"
            )
        if not_matrix:
            raise MaskMismatchError(
                f"masked weights must be 2-D weight matrices, but {'; '.join(not_matrix[:3])}"
            )
        if wrong_shape:
            more = f" ({len(wrong_shape) - 1} more weights differ)" if len(wrong_shape) > 1 else ""
            raise MaskMismatchError(f"{wrong_shape[0]}{more}; these masks were computed on {base}")
        expected = self.provenance.get("model_fingerprint")
        if check_fingerprint and expected:
            actual = model_fingerprint(model, self.names)
            if actual != expected:
                revision = self.provenance.get("revision")
                at = f" (revision {revision})" if revision else ""
                raise MaskMismatchError(
                    f"weights fingerprint differs: these masks were computed on {base}{at}, whose weights "
                    f"are not this model's ({expected} vs {actual}); pass check_fingerprint=False to apply "
                    "them to a fine-tuned model of the same base"
                )

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        revision: str | None = None,
        commit_message: str | None = None,
        token: str | bool | None = None,
    ) -> str:
        """Upload the artifact (masks file + model card) to a Hub repo; returns the commit URL."""
        from safety_peft.hub import upload_artifact_folder

        with tempfile.TemporaryDirectory(prefix="safety-masks-") as folder:
            self.save_pretrained(folder)
            card = render_model_card(self, location=repo_id)
            atomic_write(os.path.join(folder, MODEL_CARD_FILENAME), card.encode())
            return upload_artifact_folder(
                folder,
                repo_id,
                private=private,
                revision=revision,
                commit_message=commit_message or f"Upload safety masks: {self!r}",
                token=token,
            )


# ------------------------------------------------------------------------------------------ model card
def _describe(value: Any) -> str:
    if value is None:
        return "unknown"
    if isinstance(value, Mapping):
        if "source" in value:
            extra = value.get("fingerprint")
            return f"`{value['source']}`" + (f" (fingerprint `{extra}`)" if extra else "")
        return f"`{_canonical_json(value)}`"
    return f"`{value}`"


def render_model_card(masks: SafetyMasks, *, location: str | None = None) -> str:
    """The artifact's ``README.md``: Hub metadata, how to load the masks, how they were made, per-layer table.

    ``location`` is the folder or repo id the usage snippet loads from. ``base_model`` goes into the
    YAML metadata only when it looks like a Hub repo id (a local path there fails the Hub's checks).
    """
    prov = masks.provenance
    base = prov.get("base_model")
    metadata: dict[str, Any] = {"library_name": "safety-peft", "tags": ["safety-peft", "safety", "masks"]}
    if isinstance(base, str) and looks_like_repo_id(base) and not os.path.exists(base):
        metadata["base_model"] = base
    front = yaml.safe_dump(metadata, sort_keys=False).strip()
    where = location or "path/to/masks"
    title = f"Safety-critical weight masks for {base}" if base else "Safety-critical weight masks"
    unit = "output rows (neurons)" if masks.granularity is Granularity.NEURON else "entries"
    uses_utility = bool(prov.get("utility_sparsity"))
    difference = " minus those among the top-q scores on utility data (they matter for general ability too)"
    intro = (
        f"These masks mark the {unit} of a model's weights that carry its safety behaviour, found with "
        "safety-peft by scoring the weights on safety data and keeping the top-p scores"
        + (difference if uses_utility else "")
        + ". Fine-tuning with the `safety_freeze` PEFT method keeps every locked entry (`True`) bit-exact "
        "at its base value."
    )

    settings = [
        ("Base model", _describe(base)),
        ("Revision", _describe(prov.get("revision"))),
        ("Scoring method", _describe(prov.get("method"))),
        ("Safety data", _describe(prov.get("data"))),
        ("Utility data", _describe(prov.get("utility_data")) if uses_utility else "none"),
        ("Safety sparsity p", _describe(prov.get("sparsity"))),
        ("Utility sparsity q", _describe(prov.get("utility_sparsity"))),
        ("Comparison group", _describe(prov.get("group"))),
        ("Granularity", f"`{masks.granularity.value}`"),
        ("Calibration samples", _describe(prov.get("nsamples"))),
        ("Seed", _describe(prov.get("seed"))),
        ("Locked entries", f"{masks.num_locked:,} of {masks.num_entries:,} ({masks.density:.4%})"),
    ]
    lines = [
        "---",
        front,
        "---",
        "",
        f"# {title}",
        "",
        intro,
        "",
        "## How to use",
        "",
        "```python",
        "from safety_peft import SafetyFreezeConfig, SafetyMasks",
        "",
        f'masks = SafetyMasks.from_pretrained("{where}", model=model)  # refuses another model\'s masks',
        "config = SafetyFreezeConfig(masks=masks)",
        "```",
        "",
        "## How they were made",
        "",
        "| setting | value |",
        "|---|---|",
        *(f"| {key} | {value} |" for key, value in settings),
        "",
        "## Locked entries per layer",
        "",
        "| weight | shape | locked | total | density |",
        "|---|---|---:|---:|---:|",
        *(
            f"| `{s['name']}` | {'x'.join(map(str, s['shape']))} | {s['locked']:,} | {s['total']:,} "
            f"| {s['density']:.4%} |"
            for s in masks.layer_stats()
        ),
        "",
        "## Full provenance",
        "",
        "```json",
        json.dumps(prov, indent=2, sort_keys=True),
        "```",
        "",
    ]
    return "\n".join(lines)
