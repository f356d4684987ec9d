"""Which weights are targets: PEFT-style `target_modules`, defaulting to the Linear layers of the decoder blocks."""

from __future__ import annotations

import re
from typing import Sequence, Union

from torch import nn

from .errors import UnsupportedModuleError

TargetModules = Union[str, Sequence[str], None]

# Names that are never targets: TRL refuses tuner layers there, and the paper scores the decoder blocks.
_NEVER_TARGETS = ("lm_head", "embed_out", "output_projection")


def _decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The ModuleList holding one block per layer (``model.layers``, ``transformer.h``, ...)."""
    config = getattr(model, "config", None)
    n_layers = None
    if config is not None:
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        n_layers = getattr(text_config, "num_hidden_layers", None) or getattr(text_config, "n_layer", None)
    candidates = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if n_layers is not None:
        exact = [(name, m) for name, m in candidates if len(m) == n_layers]
        if exact:
            return exact[0]
    return max(candidates, key=lambda c: len(c[1]), default=None)


def _is_output_layer(model: nn.Module, name: str, module: nn.Module) -> bool:
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    return module is out or name.split(".")[-1] in _NEVER_TARGETS


def _matches(name: str, target_modules: str | Sequence[str]) -> bool:
    """PEFT's rule: a string is a regex matched in full, a list matches names or dotted suffixes."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def _unsupported(name: str, module: nn.Module) -> UnsupportedModuleError:
    kind = type(module).__name__
    hint = (
        " (transformers' Conv1D stores its weight transposed; GPT-2 style models are not supported yet)"
        if kind == "Conv1D"
        else ""
    )
    return UnsupportedModuleError(
        f"Module {name!r} is a {kind}{hint}; safety-peft scores and locks torch.nn.Linear weights only."
    )


def find_target_modules(model: nn.Module, target_modules: TargetModules = None) -> dict[str, nn.Linear]:
    """Target Linear modules keyed by module name, in model order.

    ``target_modules=None`` selects every ``nn.Linear`` inside the decoder blocks. A list selects modules
    whose name equals an entry or ends with ``"." + entry``; a string is a regular expression matched
    against the full module name. Matching a non-Linear module or the output head is an error, never a
    silent skip.
    """
    if target_modules is not None and not isinstance(target_modules, str):
        target_modules = list(target_modules)
        if not target_modules:
            raise ValueError("target_modules is an empty list; pass None for the default targets.")

    found: dict[str, nn.Linear] = {}
    if target_modules is None:
        blocks = _decoder_blocks(model)
        if blocks is None:
            raise UnsupportedModuleError(
                f"Could not find the decoder blocks of {type(model).__name__}; pass target_modules explicitly."
            )
        prefix, block_list = blocks
        prefix = prefix + "." if prefix else ""
        unsupported = []
        for name, module in block_list.named_modules():
            full = prefix + name
            if isinstance(module, nn.Linear):
                found[full] = module
            elif type(module).__name__ == "Conv1D":
                unsupported.append((full, module))
        if unsupported:  # refuse rather than silently skip part of the blocks
            raise _unsupported(*unsupported[0])
        if not found:
            raise UnsupportedModuleError(f"No nn.Linear layers found in the decoder blocks ({prefix.rstrip('.')}).")
        return found

    for name, module in model.named_modules():
        if not name or not _matches(name, target_modules):
            continue
        if _is_output_layer(model, name, module):
            raise UnsupportedModuleError(
                f"{name!r} is the output head; it is never a target (TRL refuses tuner layers on lm_head)."
            )
        if not isinstance(module, nn.Linear):
            if any(isinstance(child, nn.Linear) for child in module.children()):
                continue  # a container whose name matched; its Linear children are matched on their own
            raise _unsupported(name, module)
        found[name] = module
    if not found:
        raise ValueError(f"target_modules={target_modules!r} matched no nn.Linear module of the model.")
    return found


def weight_name(module_name: str) -> str:
    """Parameter name of a target's weight (the key of scores and masks)."""
    return f"{module_name}.weight"
