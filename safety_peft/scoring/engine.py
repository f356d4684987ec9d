"""One engine for every scoring method: hooks on all target Linears, one pass over the calibration data.

The released code of Wei et al. loops over layers (a full backward pass per layer per sample). Here the
forward hooks of every target see their inputs in the same pass; for SNIP the weights are frozen during
scoring and the gradient of each target's *output* is caught by a tensor hook, so autograd computes only
activation gradients and the engine forms each sample's weight gradient g_i^T a_i itself, one layer at a
time, into float32 accumulators.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Iterator, Literal

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..data import CalibrationData, CalibrationSource, iter_batches, load_calibration_data
from ..targets import TargetModules, find_target_modules, weight_name
from .methods import Method, ScoringMethod, SnipVariant, build_method
from .scores import SafetyScores


def _dist_info() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


@contextlib.contextmanager
def _scoring_mode(model: nn.Module, needs_backward: bool) -> Iterator[None]:
    """Eval mode, frozen weights, and (for SNIP) gradients flowing from the input embeddings."""
    was_training = model.training
    requires = {p: p.requires_grad for p in model.parameters()}
    handles = []
    try:
        model.eval()
        for p in requires:
            p.requires_grad_(False)
        if needs_backward:
            handles.append(
                model.get_input_embeddings().register_forward_hook(lambda m, i, out: out.requires_grad_(True))
            )
        with torch.enable_grad() if needs_backward else torch.no_grad():
            yield
    finally:
        for h in handles:
            h.remove()
        for p, flag in requires.items():
            p.requires_grad_(flag)
        model.train(was_training)


class _Hooks:
    """Forward hooks on the targets that hand activations (and output gradients) to the method."""

    def __init__(self, targets: dict[str, nn.Linear], method: ScoringMethod):
        self.method = method
        self.completion_mask: torch.Tensor | None = None
        self.lengths: list[int] = []
        self.handles = [module.register_forward_hook(self._hook(name)) for name, module in targets.items()]

    def _hook(self, name: str):
        method = self.method

        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            x = inputs[0]
            method.on_forward(name, x, self.completion_mask)
            if method.needs_backward:
                x = x.detach()
                output.register_hook(lambda grad: method.on_backward(name, x, grad, self.lengths))

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _completion_loss(logits: torch.Tensor, input_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """sum_i L_i with L_i the mean cross-entropy over sample i's completion targets (labels shift by one)."""
    targets = input_ids[:, 1:].masked_fill(~completion_mask[:, 1:], -100)
    per_token = F.cross_entropy(
        logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="none"
    ).view(targets.shape)
    counts = completion_mask[:, 1:].sum(dim=1).clamp(min=1)
    return (per_token.sum(dim=1) / counts).sum()


def _loss_span(completion_mask: torch.Tensor) -> list[int]:
    """Per sample, how many leading positions can influence its loss (up to the last completion target)."""
    idx = torch.arange(completion_mask.shape[1])
    return [int((idx * row).max()) for row in completion_mask.long()]


def score_model(
    model: nn.Module,
    tokenizer: Any = None,
    data: CalibrationSource | CalibrationData | None = None,
    method: Method | str = "wanda",
    *,
    nsamples: int | None = None,
    max_length: int = 512,
    batch_size: int = 4,
    target_modules: TargetModules = None,
    seed: int = 0,
    snip_variant: SnipVariant | str = "per_sample",
    chat_template: bool | Literal["auto"] = "auto",
    split: str = "train",
    progress: bool = True,
) -> SafetyScores:
    """Score every target weight of ``model`` in one pass over ``data``.

    Under ``torch.distributed`` each process scores its share of the samples and the float32
    accumulators are summed across processes, so every rank returns the single-process result (up to
    float summation order). Returns :class:`SafetyScores` keyed by parameter name.
    """
    from ..provenance import library_versions, model_fingerprint, model_identity

    targets = find_target_modules(model, target_modules)
    scorer = build_method(method, seed=seed, snip_variant=snip_variant)
    names = [weight_name(n) for n in targets]
    provenance: dict[str, Any] = {
        **model_identity(model),
        "model_fingerprint": model_fingerprint(model, names),
        "method": Method(method).value,
        "target_modules": target_modules if target_modules is None or isinstance(target_modules, str)
        else list(target_modules),
        "seed": seed,
        "library_versions": library_versions(),
    }
    if Method(method) is Method.SNIP:
        provenance["snip_variant"] = SnipVariant(snip_variant).value

    num_samples = 0
    scorer.start(targets)
    if scorer.uses_data:
        if data is None:
            raise ValueError(f"Method {Method(method).value!r} needs calibration data.")
        calib = load_calibration_data(
            data, tokenizer, nsamples=nsamples, max_length=max_length, seed=seed, split=split,
            chat_template=chat_template,
        )
        num_samples = len(calib)
        provenance["data"] = calib.describe()
        provenance.update(nsamples=num_samples, max_length=max_length)
        _accumulate(model, targets, scorer, calib, batch_size, tokenizer, progress)

    scores = {weight_name(n): scorer.finalize(n, m.weight, num_samples).cpu() for n, m in targets.items()}
    return SafetyScores(scores, provenance)


def _accumulate(
    model: nn.Module,
    targets: dict[str, nn.Linear],
    scorer: ScoringMethod,
    calib: CalibrationData,
    batch_size: int,
    tokenizer: Any,
    progress: bool,
) -> None:
    rank, world = _dist_info()
    samples = calib.shard(rank, world)
    pad_id = getattr(tokenizer, "pad_token_id", None) or 0
    device = next(model.parameters()).device
    forward_kwargs: dict[str, Any] = {"use_cache": False}
    if not scorer.needs_backward and "logits_to_keep" in inspect.signature(model.forward).parameters:
        forward_kwargs["logits_to_keep"] = 1  # activations are all we need: skip most of the output head

    hooks = _Hooks(targets, scorer)
    n_batches = (len(samples) + batch_size - 1) // batch_size
    bar = tqdm(
        iter_batches(samples, batch_size, pad_id), total=n_batches, disable=not progress or rank != 0,
        desc=f"Scoring ({type(scorer).__name__.lower()})", unit="batch",
    )
    try:
        with _scoring_mode(model, scorer.needs_backward):
            for batch in bar:
                batch = {k: v.to(device) for k, v in batch.items()}
                hooks.completion_mask = batch["completion_mask"]
                hooks.lengths = _loss_span(batch["completion_mask"].cpu())
                out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **forward_kwargs)
                if scorer.needs_backward:
                    _completion_loss(out.logits, batch["input_ids"], batch["completion_mask"]).backward()
                scorer.end_batch()
                del out
    finally:
        hooks.remove()
    if world > 1:
        scorer.reduce(lambda t: torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM))
