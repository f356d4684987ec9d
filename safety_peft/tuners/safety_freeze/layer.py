"""The tuner layer: a frozen ``nn.Linear`` whose effective weight is ``where(M, W, W + Δ)``.

``M`` (True = locked) picks the base bits ``W`` exactly; every other entry is ``W + Δ``. ``Δ`` is a dense
trainable tensor (adapter ``"delta"``: full fine-tuning of the unlocked entries) or ``(α/r)·B·A``
(adapter ``"lora"``). With neuron (row) masks, LoRA zeroes the locked output rows of its update
(``where(row_locked, 0, B)``) and never forms Δ, so a locked output is ``base(x)`` plus zero.

Each layer keeps its mask twice: the compact encoding from ``SafetyMasks.to_encoded`` as a persistent
buffer (``safety_freeze_mask_code``, so ``adapter_model.safetensors`` carries the masks), and the decoded
:class:`Lock` in a plain cache that is neither saved nor broadcast by DDP. The cache is rebuilt when the
code buffer is replaced (transformers' ``load_adapter``) or loaded in place (PEFT's ``load_state_dict``,
a Trainer resume); decoding goes through :class:`AdapterMasks`, which checks the whole adapter's checksum.
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

ADAPTER_KINDS = ("delta", "lora")


def _compute_dtype(device: torch.device, weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype a plain ``nn.Linear`` would multiply in here: the autocast dtype, else the weight's."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return weight_dtype


class Lock:
    """The locked entries of one weight, held in the form that is cheapest to apply.

    ``restore_(target, base)`` gives ``where(M, base, target)``, so ``restore_(W + Δ, W)`` is
    ``where(M, W, W + Δ)`` bit for bit; ``zero_(grad)`` does ``grad[M] = 0`` in place. Neuron masks keep
    the locked row numbers; weight masks keep the sorted flat indices of the locked entries (int32) when at
    most half of them are locked, else the bool mask itself. On CPU, copying the locked entries by index
    is several times faster than a ``torch.where`` over a bool mask (whose cost grows with the share of
    locked entries), and below a quarter locked the indices are also smaller than the mask.
    """

    def __init__(self, mask: torch.Tensor, shape: tuple[int, int]) -> None:
        self.shape = tuple(shape)
        self.rows = self.flat = self.mask = None
        if mask.dim() == 1:
            self.rows = mask.nonzero().squeeze(1)
            self.num_locked = int(self.rows.numel()) * self.shape[1]
        else:
            self.num_locked = int(mask.sum())
            if self.num_locked * 2 <= mask.numel():
                index_dtype = torch.int32 if mask.numel() < 2**31 else torch.int64
                self.flat = mask.reshape(-1).nonzero().squeeze(1).to(index_dtype)
            else:
                self.mask = mask

    @property
    def device(self) -> torch.device:
        return next(t for t in (self.rows, self.flat, self.mask) if t is not None).device

    def to(self, device: torch.device) -> Lock:
        if self.device == device:
            return self
        other = copy.copy(self)
        other.rows, other.flat, other.mask = (None if t is None else t.to(device) for t in (self.rows, self.flat, self.mask))
        return other

    def restore_(self, target: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """``where(M, base, target)`` (``base`` converted to ``target``'s dtype); use the returned tensor.

        Rows and indices are written into ``target`` in place; a bool mask gives a new tensor (a
        ``torch.where`` with ``out=`` cannot be differentiated).
        """
        if self.rows is not None:
            return target.index_copy_(0, self.rows, base.index_select(0, self.rows).to(target.dtype))
        if self.flat is not None:
            values = base.reshape(-1).index_select(0, self.flat).to(target.dtype)
            target.view(-1).index_put_((self.flat,), values)
            return target
        return torch.where(self.mask, base.to(target.dtype), target)

    def zero_(self, grad: torch.Tensor) -> torch.Tensor:
        """``grad[M] = 0`` in place; returns ``grad``."""
        if self.rows is not None:
            grad.index_fill_(0, self.rows, 0.0)
        elif self.flat is not None:
            grad.view(-1).index_put_((self.flat,), torch.zeros((), dtype=grad.dtype, device=grad.device))
        else:
            grad.masked_fill_(self.mask, 0.0)
        return grad

    def bool_mask(self) -> torch.Tensor:
        """The full-shape bool mask (True = locked)."""
        if self.mask is not None:
            return self.mask
        if self.rows is not None:
            rows = torch.zeros(self.shape[0], dtype=torch.bool, device=self.rows.device)
            rows[self.rows] = True
            return rows[:, None].expand(self.shape)
        mask = torch.zeros(self.shape[0] * self.shape[1], dtype=torch.bool, device=self.flat.device)
        mask[self.flat] = True
        return mask.view(self.shape)


def locked_weight(weight: torch.Tensor, delta: torch.Tensor, lock: Lock, dtype: torch.dtype) -> torch.Tensor:
    """``where(M, weight, weight + delta)`` as a new ``dtype`` tensor.

    The sum is computed in the wider dtype and rounded once to ``dtype``; locked entries are ``weight``
    converted to ``dtype``: exactly the base bits when ``dtype`` is the weight's own dtype (as in merging),
    and under autocast the same rounding a plain Linear applies to its weight.
    """
    summed = torch.add(weight, delta)  # in the wider dtype; an add with a narrower out= is not vectorized on CPU
    if summed.dtype != dtype:
        summed = summed.to(dtype)
    return lock.restore_(summed, weight)


class _LockedLinear(torch.autograd.Function):
    """``F.linear(x, where(M, W, W + Δ), b)`` that keeps only what a plain Linear keeps for backward.

    Autograd through the lock would keep the full-precision effective weight of every layer alive until
    backward. Here, under autocast the low-precision copy is kept (a plain Linear under autocast keeps the
    same), and without autocast the effective weight is recomputed in backward from ``W`` and ``Δ``, which
    are alive anyway. ``W`` gets no gradient; ``Δ`` gets ``where(M, 0, ∂L/∂W_eff)``, its true gradient
    (locked entries of Δ have no effect on the output), so gradient clipping sees the real norm.
    """

    @staticmethod
    def forward(ctx, x, weight, delta, lock, bias):
        dtype = _compute_dtype(x.device, weight.dtype)
        x_c = x.to(dtype)
        w_c = locked_weight(weight, delta, lock, dtype)
        out = F.linear(x_c, w_c, None if bias is None else bias.to(dtype))
        recompute = dtype == torch.promote_types(weight.dtype, delta.dtype)
        ctx.lock, ctx.x_dtype, ctx.dtype = lock, x.dtype, dtype
        ctx.bias_dtype = bias.dtype if bias is not None and bias.requires_grad else None
        ctx.save_for_backward(x_c, weight, delta, None if recompute else w_c)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x_c, weight, delta, w_c = ctx.saved_tensors
        grad_out = grad_out.to(ctx.dtype)
        grad_x = grad_delta = grad_bias = None
        if ctx.needs_input_grad[0]:
            if w_c is None:
                w_c = locked_weight(weight, delta, ctx.lock, ctx.dtype)
            grad_x = (grad_out @ w_c).to(ctx.x_dtype)
        flat_grad = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.needs_input_grad[2]:
            g = flat_grad.t() @ x_c.reshape(-1, x_c.shape[-1])
            grad_delta = ctx.lock.zero_(g.to(delta.dtype))
        if ctx.bias_dtype is not None:
            grad_bias = flat_grad.sum(0).to(ctx.bias_dtype)
        return grad_x, None, grad_delta, None, grad_bias


class AdapterMasks:
    """The masks of one adapter, shared by its layers: the encoding header and which layer holds which mask.

    Decoding is all-or-nothing over the adapter so that the header's checksum is verified on every
    (re)load; each layer then gets its :class:`Lock`.
    """

    def __init__(self, adapter_name: str, header: dict[str, Any], *, loaded: bool) -> None:
        self.adapter_name = adapter_name
        self.header = header
        self.layers: dict[str, SafetyFreezeLayer] = {}  # mask (weight) name -> layer
        self.loaded = loaded  # False while the codes are placeholders waiting for the adapter weights
        self.placeholders: dict[str, tuple[torch.Tensor, int]] = {}  # name -> (placeholder code, its version)

    @property
    def granularity(self) -> str:
        return self.header["granularity"]

    def decode(self) -> None:
        """Decode every layer's code buffer and hand each layer its lock."""
        from safety_peft.errors import MaskFileError
        from safety_peft.masks import SafetyMasks

        codes = {name: layer.safety_freeze_mask_code[self.adapter_name] for name, layer in self.layers.items()}
        listed = set(self.header["masks"])
        if set(codes) != listed:
            from safety_peft.errors import MaskMismatchError

            missing, extra = sorted(listed - set(codes)), sorted(set(codes) - listed)
            raise MaskMismatchError(
                f"adapter {self.adapter_name!r}: the model's locked layers do not match the adapter's masks "
                f"(masks without a layer: {missing[:3]}, layers without a mask: {extra[:3]})"
            )
        try:
            masks = SafetyMasks.from_encoded({n: c.detach().cpu() for n, c in codes.items()}, self.header)
        except MaskFileError as err:
            untouched = all(
                codes[n] is code and codes[n]._version == version for n, (code, version) in self.placeholders.items()
            )
            if not self.loaded and untouched:
                raise MaskFileError(
                    f"the masks of adapter {self.adapter_name!r} were never loaded: this model was built from a "
                    "saved SafetyFreezeConfig alone. Load the adapter weights too (PeftModel.from_pretrained, "
                    "model.load_adapter), or pass masks= to SafetyFreezeConfig."
                ) from err
            raise MaskFileError(f"adapter {self.adapter_name!r}: {err}") from err
        for name, layer in self.layers.items():
            mask = masks.row_mask(name) if self.granularity == "neuron" else masks.mask(name)
            layer._set_lock(self.adapter_name, codes[name], Lock(mask, layer.weight_shape))
        self.loaded = True


class SafetyFreezeLayer(BaseTunerLayer):
    """Per adapter: a lock and a dense (``delta``) or low-rank (``lora``) update of the frozen weight."""

    adapter_layer_names = ("safety_freeze_delta", "safety_freeze_A", "safety_freeze_B")
    other_param_names = (
        "safety_freeze_mask_code",
        "safety_freeze_dropout",
        "adapter_kind",
        "r",
        "lora_alpha",
        "scaling",
        "adapter_masks",
    )

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.safety_freeze_delta = nn.ParameterDict({})
        self.safety_freeze_A = nn.ModuleDict({})
        self.safety_freeze_B = nn.ModuleDict({})
        self.safety_freeze_dropout = nn.ModuleDict({})
        self.safety_freeze_mask_code = BufferDict({}, persistent=True)
        self.adapter_kind: dict[str, str] = {}
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.adapter_masks: dict[str, AdapterMasks] = {}
        # adapter -> (the code tensor the lock was decoded from, the lock); never saved
        self._locks: dict[str, tuple[torch.Tensor, Lock]] = {}
        # the base weight as it was before the first merge, so that unmerge restores it bit for bit
        self._weight_before_merge: torch.Tensor | None = None
        self._disable_adapters = False
        self.merged_adapters = []
        self.kwargs = kwargs
        base = self.get_base_layer()
        if not isinstance(base, nn.Linear):
            from safety_peft.errors import UnsupportedModuleError

            raise UnsupportedModuleError(f"safety_freeze wraps torch.nn.Linear only, got {type(base).__name__}.")
        self.in_features, self.out_features = base.in_features, base.out_features

    @property
    def weight_shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def update_layer(
        self,
        adapter_name: str,
        *,
        mask_name: str,
        adapter_masks: AdapterMasks,
        code: torch.Tensor,
        adapter_kind: str = "delta",
        r: int = 8,
        lora_alpha: float = 16,
        lora_dropout: float = 0.0,
        init_weights: bool = True,
        inference_mode: bool = False,
        mask: torch.Tensor | None = None,
    ) -> None:
        """Add adapter ``adapter_name``; ``mask``, when given, is ``code`` already decoded."""
        if adapter_kind not in ADAPTER_KINDS:
            raise ValueError(f"adapter must be one of {ADAPTER_KINDS}, got {adapter_kind!r}.")
        weight = self.get_base_layer().weight
        self.adapter_kind[adapter_name] = adapter_kind
        self.adapter_masks[adapter_name] = adapter_masks
        adapter_masks.layers[mask_name] = self
        self.safety_freeze_mask_code[adapter_name] = code.to(weight.device)
        self._locks.pop(adapter_name, None)
        if not adapter_masks.loaded:
            placeholder = self.safety_freeze_mask_code[adapter_name]
            adapter_masks.placeholders[mask_name] = (placeholder, placeholder._version)
        if mask is not None:
            self._set_lock(adapter_name, self.safety_freeze_mask_code[adapter_name], Lock(mask, self.weight_shape))

        if adapter_kind == "delta":
            delta = torch.zeros(self.weight_shape, dtype=weight.dtype, device=weight.device)
            if not init_weights:  # a random update, for tests of the lock
                delta.normal_(std=0.02)
            self.safety_freeze_delta[adapter_name] = nn.Parameter(delta)
        else:
            if r <= 0:
                raise ValueError(f"r must be a positive integer, got {r}.")
            self.r[adapter_name] = r
            self.lora_alpha[adapter_name] = lora_alpha
            self.scaling[adapter_name] = lora_alpha / r
            self.safety_freeze_dropout[adapter_name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
            a = nn.Linear(self.in_features, r, bias=False)
            b = nn.Linear(r, self.out_features, bias=False)
            nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
            if init_weights:
                nn.init.zeros_(b.weight)
            else:
                nn.init.normal_(b.weight, std=0.02)
            self.safety_freeze_A[adapter_name] = a
            self.safety_freeze_B[adapter_name] = b
        # adapters live on the base weight's device and dtype; PeftModel then upcasts them to float32
        # unless autocast_adapter_dtype=False
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    # ------------------------------------------------------------------------------------------ locks
    def _set_lock(self, adapter_name: str, code: torch.Tensor, lock: Lock) -> None:
        if lock.shape != self.weight_shape:
            from safety_peft.errors import MaskMismatchError

            raise MaskMismatchError(f"lock of shape {lock.shape} for a weight of shape {self.weight_shape}")
        self._locks[adapter_name] = (code, lock.to(self.get_base_layer().weight.device))

    def lock(self, adapter_name: str) -> Lock:
        """The decoded lock of ``adapter_name`` on the base weight's device (decoding on first use)."""
        code = self.safety_freeze_mask_code[adapter_name]
        cached = self._locks.get(adapter_name)
        if cached is None or cached[0] is not code:
            self.adapter_masks[adapter_name].decode()
            cached = self._locks[adapter_name]
        device = self.get_base_layer().weight.device
        if cached[1].device != device:
            cached = (code, cached[1].to(device))
            self._locks[adapter_name] = cached
        return cached[1]

    def _load_from_state_dict(self, state_dict, prefix, *args: Any, **kwargs: Any) -> None:
        # load_state_dict copies saved codes into the buffers in place: decode again on next use
        self._locks.clear()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def delete_adapter(self, adapter_name: str) -> None:
        masks = self.adapter_masks.get(adapter_name)
        if masks is not None:
            masks.layers = {n: layer for n, layer in masks.layers.items() if layer is not self}
        self._locks.pop(adapter_name, None)
        super().delete_adapter(adapter_name)

    # ---------------------------------------------------------------------------------------- updates
    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """Δ as a dense tensor (the lock ignores its locked entries, whatever their value)."""
        if self.adapter_kind[adapter_name] == "delta":
            return self.safety_freeze_delta[adapter_name]
        a = self.safety_freeze_A[adapter_name].weight
        b = self.safety_freeze_B[adapter_name].weight
        return (b @ a) * self.scaling[adapter_name]

    def effective_weight(self, adapter_names: list[str] | None = None) -> torch.Tensor:
        """``where(M, W, W + Δ)`` in the base weight's dtype, adapter after adapter (as merging writes it)."""
        weight = self.get_base_layer().weight.detach()
        names = self.active_adapters if adapter_names is None else adapter_names
        with torch.no_grad():
            for name in names:
                if name in self.adapter_kind:
                    weight = locked_weight(weight, self.get_delta_weight(name), self.lock(name), weight.dtype)
        return weight

    def current_weight(self) -> torch.Tensor:
        """The weight the forward pass uses now: base if disabled or merged, else locked by the active adapters."""
        if self.disable_adapters and self._weight_before_merge is not None:
            return self._weight_before_merge  # the next forward unmerges first
        if self.disable_adapters or self.merged:
            return self.get_base_layer().weight.detach()
        return self.effective_weight()

    def set_scale(self, adapter: str, scale: float) -> None:
        if adapter in self.scaling:
            self.scaling[adapter] = scale * self.lora_alpha[adapter] / self.r[adapter]


class Linear(nn.Module, SafetyFreezeLayer):
    """``nn.Linear`` with a locked update; see the module docstring for the math."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, **kwargs: Any) -> None:
        super().__init__()
        SafetyFreezeLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, **kwargs)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        active = [a for a in self.active_adapters if a in self.adapter_kind]
        if self.merged or not active:
            return self.base_layer(x, *args, **kwargs)
        base = self.get_base_layer()
        if len(active) > 1:
            # several active adapters: each locks its own mask, applied in order as merging does
            weight = base.weight
            for name in active:
                delta = self.get_delta_weight(name)
                summed = self.lock(name).restore_(weight + delta, weight)
                weight = summed
            dtype = _compute_dtype(x.device, base.weight.dtype)
            return F.linear(x.to(dtype), weight.to(dtype), None if base.bias is None else base.bias.to(dtype))
        name = active[0]
        if self.adapter_kind[name] == "delta":
            return _LockedLinear.apply(x, base.weight, self.safety_freeze_delta[name], self.lock(name), base.bias)
        lock = self.lock(name)
        if lock.rows is not None:
            return self._lora_rows_forward(x, name, lock, *args, **kwargs)
        return self._lora_weight_forward(x, name, lock)

    def _lora_rows_forward(self, x: torch.Tensor, name: str, lock: Lock, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``base(x) + where(row_locked, 0, s·B·A·x)``: locked rows of B are zeroed, Δ is never formed."""
        result = self.base_layer(x, *args, **kwargs)
        a = self.safety_freeze_A[name]
        b = lock.zero_(self.safety_freeze_B[name].weight.clone())
        h = a(self.safety_freeze_dropout[name](self._cast_input_dtype(x, a.weight.dtype)))
        return result + (F.linear(h, b.to(h.dtype)) * self.scaling[name]).to(result.dtype)

    def _lora_weight_forward(self, x: torch.Tensor, name: str, lock: Lock) -> torch.Tensor:
        """Weight masks: Δ = s·B·A is formed and locked entry by entry."""
        base = self.get_base_layer()
        delta = self.get_delta_weight(name)
        dropout = self.safety_freeze_dropout[name]
        if isinstance(dropout, nn.Identity) or not self.training:
            return _LockedLinear.apply(x, base.weight, delta, lock, base.bias)
        # dropout acts on the update's input only: W·x + where(M, 0, Δ)·drop(x)
        result = self.base_layer(x)
        update = lock.zero_(delta.clone())
        return result + F.linear(dropout(x).to(result.dtype), update.to(result.dtype))

    # ------------------------------------------------------------------------------------------ merge
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Write ``where(M, W, W + Δ)`` into the base weight; the pre-merge weight is kept for ``unmerge``."""
        adapter_names = [a for a in check_adapters_to_merge(self, adapter_names) if a in self.adapter_kind]
        if not adapter_names:
            return
        base = self.get_base_layer()
        merged = self.effective_weight(adapter_names)
        if safe_merge and not torch.isfinite(merged).all() and torch.isfinite(base.weight).all():
            raise ValueError(f"NaNs detected in the merged weights; adapter(s) {adapter_names} seem broken.")
        if self._weight_before_merge is None:
            self._weight_before_merge = base.weight.detach().clone()
        base.weight.data = merged
        self.merged_adapters.extend(adapter_names)

    def unmerge(self) -> None:
        """Restore the base weight exactly as it was before the first merge."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        if self._weight_before_merge is not None:
            self.get_base_layer().weight.data = self._weight_before_merge
        self._weight_before_merge = None
        self.merged_adapters = []

    def __repr__(self) -> str:
        return "safety_freeze." + super().__repr__()
