"""``SafetyFreezeModel``: finds the target Linears, checks the masks against the model, swaps in locked layers."""

from __future__ import annotations

import math
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_target_module_exists
from torch import nn

from safety_peft.errors import MaskMismatchError, UnsupportedModuleError

from .config import PEFT_METHOD_NAME, SafetyFreezeConfig, check_not_output_head, describe_masks
from .layer import AdapterMasks, Linear, SafetyFreezeLayer


def weight_name(module_name: str) -> str:
    return f"{module_name}.weight"


def module_name(weight_name: str) -> str:
    return weight_name.removesuffix(".weight")


class SafetyFreezeModel(BaseTuner):
    """The tuner behind ``get_peft_model(model, SafetyFreezeConfig(...))``.

    At injection the masks are resolved (object, folder, file or Hub repo), checked against the model
    (names, shapes, weight fingerprint) and every targeted ``nn.Linear`` is wrapped in a locked layer.
    A targeted module without a mask, a non-Linear target (e.g. transformers' ``Conv1D``) and the output
    head are refused before anything is changed.
    """

    prefix: str = PEFT_METHOD_NAME + "_"
    tuner_layer_cls = SafetyFreezeLayer
    target_module_mapping: dict[str, list[str]] = {}

    # ---------------------------------------------------------------------------------------- injection
    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        config: SafetyFreezeConfig = self.peft_config[adapter_name]
        masks = _resolve_masks(config, model)
        if config.target_modules is None:
            names = masks.names if masks is not None else list(config.masks_header["masks"])
            config.target_modules = [module_name(n) for n in names]
        check_not_output_head(config.target_modules)
        targets = self._find_targets(config, model)
        header_names = set(masks.names if masks is not None else config.masks_header["masks"])
        without_mask = [t for t in targets if weight_name(t) not in header_names]
        if without_mask:
            shown = ", ".join(repr(t) for t in without_mask[:3])
            more = f" and {len(without_mask) - 3} more" if len(without_mask) > 3 else ""
            raise MaskMismatchError(
                f"{len(without_mask)} targeted module(s) have no mask: {shown}{more}. Compute masks for them "
                "(find_safety_critical(..., target_modules=...)) or leave target_modules unset to target "
                "exactly the masked modules."
            )
        if masks is not None:
            wanted = [weight_name(t) for t in targets]
            if len(wanted) != len(masks):
                from safety_peft.masks import SafetyMasks

                provenance = dict(masks.provenance)
                if provenance.get("model_fingerprint"):
                    # the fingerprint covers the masked weights; the adapter keeps only the targeted ones
                    # (checked against this model above, so their fingerprint is taken from it)
                    from safety_peft.provenance import model_fingerprint

                    provenance["model_fingerprint"] = model_fingerprint(nn.ModuleDict({"wrapped": model}), wanted)
                masks = SafetyMasks(
                    {n: masks.row_mask(n) if masks.granularity == "neuron" else masks.mask(n) for n in wanted},
                    granularity=masks.granularity,
                    shapes={n: masks.shape(n) for n in wanted},
                    provenance=provenance,
                )
            codes, header = masks.to_encoded()
            config.masks_header = header
            if config.masks_source is None:
                config.masks_source = describe_masks(config.masks)
        else:
            granularity = config.masks_header["granularity"]
            codes = {n: _placeholder_code(e, granularity) for n, e in config.masks_header["masks"].items()}
        self._injection = {
            "masks": masks,
            "codes": codes,
            "store": AdapterMasks(adapter_name, config.masks_header, loaded=masks is not None),
        }
        try:
            super().inject_adapter(
                model,
                adapter_name,
                autocast_adapter_dtype=autocast_adapter_dtype,
                low_cpu_mem_usage=low_cpu_mem_usage,
                state_dict=state_dict,
            )
        finally:
            del self._injection

    def _find_targets(self, config: SafetyFreezeConfig, model: nn.Module) -> list[str]:
        """Module names PEFT will target, checked before any layer is swapped."""
        output_head = _output_head(model)
        targets = []
        for key, module in model.named_modules():
            if not key or _inside_tuner_layer(model, key):
                continue
            if not check_target_module_exists(config, key):
                continue
            if module is output_head or key.split(".")[-1] in ("lm_head", "embed_out"):
                raise UnsupportedModuleError(
                    f"{key!r} is the output head; safety_freeze never targets it (TRL computes log-probabilities "
                    "from lm_head.weight directly). Remove it from target_modules."
                )
            if not isinstance(module, (nn.Linear, SafetyFreezeLayer)):
                kind = type(module).__name__
                hint = " (transformers' Conv1D stores its weight transposed, as in GPT-2)" if kind == "Conv1D" else ""
                raise UnsupportedModuleError(
                    f"target {key!r} is a {kind}{hint}; safety_freeze locks torch.nn.Linear weights only."
                )
            targets.append(key)
        return targets

    def _create_and_replace(
        self,
        peft_config: SafetyFreezeConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        name = weight_name(current_key)
        injection = self._injection
        masks = injection["masks"]
        if masks is not None:
            mask = masks.row_mask(name) if masks.granularity == "neuron" else masks.mask(name)
        else:
            mask = None
        kwargs = dict(
            mask_name=name,
            adapter_masks=injection["store"],
            code=injection["codes"][name],
            mask=mask,
            adapter_kind=peft_config.adapter,
            r=peft_config.r,
            lora_alpha=peft_config.lora_alpha,
            lora_dropout=peft_config.lora_dropout,
            init_weights=peft_config.init_weights,
            inference_mode=peft_config.inference_mode,
        )
        if isinstance(target, SafetyFreezeLayer):
            target.update_layer(adapter_name, **kwargs)
            return
        if not isinstance(target, nn.Linear):
            raise UnsupportedModuleError(
                f"target {current_key!r} is a {type(target).__name__}; safety_freeze locks torch.nn.Linear only."
            )
        new_module = Linear(target, adapter_name, **kwargs)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added adapter is not trainable until set_adapter
        self._replace_module(parent, target_name, new_module, target)

    # ------------------------------------------------------------------------------------------ inspection
    def lock_layers(self) -> dict[str, SafetyFreezeLayer]:
        """Locked layers by weight name (``model.layers.0.self_attn.q_proj.weight``)."""
        return {weight_name(n): m for n, m in self.model.named_modules() if isinstance(m, SafetyFreezeLayer)}

    def get_masks(self, adapter_name: str = "default"):
        """The adapter's masks as a ``SafetyMasks`` (decoded from what the layers hold)."""
        from safety_peft.masks import SafetyMasks

        layers = {n: layer for n, layer in self.lock_layers().items() if adapter_name in layer.adapter_kind}
        if not layers:
            raise ValueError(f"no layer holds adapter {adapter_name!r}")
        store = next(iter(layers.values())).adapter_masks[adapter_name]
        neuron = store.granularity == "neuron"
        masks = {}
        for name, layer in layers.items():
            full = layer.lock(adapter_name).bool_mask().cpu()
            masks[name] = full[:, 0].clone() if neuron else full.clone()
        shapes = {n: layer.weight_shape for n, layer in layers.items()}
        return SafetyMasks(
            masks, granularity=store.granularity, shapes=shapes, provenance=store.header.get("provenance")
        )

    def lock_summary(self, adapter_name: str | None = None) -> dict[str, int]:
        """Counts that say what really trains.

        ``trainable_params`` is what the optimizer holds (PEFT's count); ``trainable_entries`` the weight
        entries an update can change (the unlocked ones); ``locked_entries`` those kept at their base bits.
        """
        name = adapter_name or self.active_adapters[0]
        config = self.peft_config[name]
        locked = total = params = 0
        for layer in self.lock_layers().values():
            if name not in layer.adapter_kind:
                continue
            lock = layer.lock(name)
            locked += lock.num_locked
            total += math.prod(layer.weight_shape)
        for param_name, param in self.model.named_parameters():
            if param.requires_grad:
                params += param.numel()
        return {
            "adapter": name,
            "kind": config.adapter,
            "trainable_params": params,
            "locked_entries": locked,
            "trainable_entries": total - locked,
            "target_entries": total,
        }

    def print_lock_summary(self, adapter_name: str | None = None) -> None:
        s = self.lock_summary(adapter_name)
        share = s["locked_entries"] / s["target_entries"] if s["target_entries"] else 0.0
        print(
            f"adapter {s['adapter']!r} ({s['kind']}): trainable params: {s['trainable_params']:,d} || "
            f"target weight entries: {s['target_entries']:,d} || locked (base bits): {s['locked_entries']:,d} "
            f"({share:.2%}) || unlocked, trained: {s['trainable_entries']:,d}"
        )


def _placeholder_code(entry: dict[str, Any], granularity: str) -> torch.Tensor:
    """A zero code of the exact size and dtype the saved adapter holds, to be filled by loading it."""
    shape = entry.get("shape")
    if entry.get("encoding") == "indices":
        return torch.zeros(int(entry["num_locked"]), dtype=torch.int32)
    n = int(shape[0]) if granularity == "neuron" else math.prod(shape)
    return torch.zeros(math.ceil(n / 8), dtype=torch.uint8)


def _output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    try:
        return get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        return None


def _inside_tuner_layer(model: nn.Module, key: str) -> bool:
    parts = key.split(".")
    for i in range(1, len(parts)):
        if isinstance(model.get_submodule(".".join(parts[:i])), BaseTunerLayer):
            return True
    return False


def _resolve_masks(config: SafetyFreezeConfig, model: nn.Module):
    """The ``SafetyMasks`` to apply, checked against ``model``; ``None`` when loading a saved adapter."""
    from safety_peft.masks import SafetyMasks

    masks = config.masks
    # Seen from a wrapper, the weights of layers already swapped in ("<module>.base_layer.weight") are
    # found by the suffix rule of SafetyMasks.validate; seen from the model itself they would not be.
    model = nn.ModuleDict({"wrapped": model})
    if isinstance(masks, SafetyMasks):
        masks.validate(model, check_fingerprint=config.check_fingerprint)
        return masks
    if isinstance(masks, str):
        return SafetyMasks.from_pretrained(
            masks, model=model, revision=config.masks_revision, check_fingerprint=config.check_fingerprint
        )
    header = config.masks_header
    if not header:
        raise ValueError(
            "SafetyFreezeConfig needs masks: pass masks= a SafetyMasks object, a mask folder or a Hub repo id "
            "(compute them with safety_peft.find_safety_critical)."
        )
    _validate_header(header, model, check_fingerprint=config.check_fingerprint)
    return None


def _validate_header(header: dict[str, Any], model: nn.Module, *, check_fingerprint: bool) -> None:
    """Check a saved adapter's masks against ``model`` before its weights are even read."""
    from safety_peft.errors import MaskFileError
    from safety_peft.masks import SafetyMasks

    entries = header.get("masks")
    granularity = header.get("granularity")
    if not isinstance(entries, dict) or granularity not in ("weight", "neuron"):
        raise MaskFileError("adapter_config.json has a malformed masks_header (no masks table or granularity)")
    # empty masks with the recorded names, shapes and provenance reuse SafetyMasks.validate's checks
    shapes = {name: tuple(entry["shape"]) for name, entry in entries.items()}
    empty = {
        name: torch.zeros(shape[0] if granularity == "neuron" else shape, dtype=torch.bool)
        for name, shape in shapes.items()
    }
    SafetyMasks(empty, granularity=granularity, shapes=shapes, provenance=header.get("provenance")).validate(
        model, check_fingerprint=check_fingerprint
    )


def locked_delta_entries(tuner: SafetyFreezeModel) -> int:
    """Entries of trainable dense updates (``adapter="delta"``) that are locked and so never change."""
    count = 0
    for layer in tuner.lock_layers().values():
        for name, delta in layer.safety_freeze_delta.items():
            if delta.requires_grad:
                count += layer.lock(name).num_locked
    return count


def count_only_what_trains() -> None:
    """Make ``PeftModel.print_trainable_parameters`` count a dense update's unlocked entries only.

    PeftModel counts every element of a trainable tensor; a locked entry of Δ has no effect on the model
    (its gradient is zero and the forward ignores it), so it is subtracted. Other methods are unaffected.
    """
    from peft import PeftModel

    original = PeftModel.get_nb_trainable_parameters
    if getattr(original, "_safety_freeze", False):
        return

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable, total = original(self)
        if isinstance(self.base_model, SafetyFreezeModel):
            trainable -= locked_delta_entries(self.base_model)
        return trainable, total

    get_nb_trainable_parameters._safety_freeze = True
    get_nb_trainable_parameters.__doc__ = original.__doc__
    PeftModel.get_nb_trainable_parameters = get_nb_trainable_parameters
