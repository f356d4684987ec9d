"""Scoring methods as small plug-ins of one engine.

A method owns float32 accumulators for the target weights and turns them into scores at the end. The
engine (``engine.py``) owns everything else: hooks, batches, the backward pass, processes and progress.
Formulas (``N`` samples, ``c`` the completion mask, ``a`` a target's input activations):

* wanda:     S[k, j] = |W[k, j]| * sqrt((1/N) * sum_i sum_{t: c_it = 1} a_itj^2)
* snip:      S = |W| * sum_i |dL_i/dW|    (per-sample absolute value; ``snip_variant="sum"`` takes
             |sum_i dL_i/dW| instead)
* magnitude: S = |W|
* random:    seeded uniform scores, a control of the same size
"""

from __future__ import annotations

from enum import Enum
from typing import Callable

import torch
from torch import nn

# Per-sample gradients of one layer are formed one sample at a time into a reused buffer, so memory
# stays at one weight-sized float32 buffer per layer shape (never per-sample gradients of the model).


class Method(str, Enum):
    WANDA = "wanda"
    SNIP = "snip"
    MAGNITUDE = "magnitude"
    RANDOM = "random"


class SnipVariant(str, Enum):
    PER_SAMPLE = "per_sample"  # sum_i |grad_i|, as the released code (the default)
    SUM = "sum"  # |sum_i grad_i|, cheaper: one matmul per layer and batch


class ScoringMethod:
    """Base plug-in: accumulators keyed by target name, plus a final formula."""

    uses_data = True
    needs_backward = False

    def start(self, targets: dict[str, nn.Linear]) -> None:
        self.acc: dict[str, torch.Tensor] = {}

    def on_forward(self, name: str, x: torch.Tensor, completion_mask: torch.Tensor) -> None:
        """Called by the forward hook of target ``name`` with its input ``x`` (B, T, in)."""

    def on_backward(self, name: str, x: torch.Tensor, grad_out: torch.Tensor, lengths: list[int]) -> None:
        """Called when the gradient of target ``name``'s output (B, T, out) is known."""

    def end_batch(self) -> None:
        """Called after each batch: drop anything cached for the batch."""

    def reduce(self, all_reduce: Callable[[torch.Tensor], None]) -> None:
        for t in self.acc.values():
            all_reduce(t)

    def finalize(self, name: str, weight: torch.Tensor, num_samples: int) -> torch.Tensor:
        raise NotImplementedError


class Wanda(ScoringMethod):
    def start(self, targets: dict[str, nn.Linear]) -> None:
        device = next(iter(targets.values())).weight.device
        self.acc = {n: torch.zeros(m.in_features, dtype=torch.float32, device=device) for n, m in targets.items()}
        self._last_x: torch.Tensor | None = None
        self._last_sq: torch.Tensor | None = None

    def on_forward(self, name: str, x: torch.Tensor, completion_mask: torch.Tensor) -> None:
        # q/k/v (and gate/up) read the same tensor: compute its column sums of squares once.
        if x is not self._last_x:
            # Gather the completion rows, then square and sum them in float32 (einsum was >100x slower on CPU).
            tokens = x.reshape(-1, x.shape[-1])[completion_mask.reshape(-1)].float()
            self._last_x, self._last_sq = x, tokens.square_().sum(0)
        self.acc[name].add_(self._last_sq)

    def end_batch(self) -> None:
        self._last_x = self._last_sq = None

    def finalize(self, name: str, weight: torch.Tensor, num_samples: int) -> torch.Tensor:
        norms = (self.acc[name] / num_samples).sqrt_()
        return weight.detach().float().abs().mul_(norms.unsqueeze(0))


class Snip(ScoringMethod):
    needs_backward = True

    def __init__(self, variant: SnipVariant | str = SnipVariant.PER_SAMPLE):
        self.variant = SnipVariant(variant)

    def start(self, targets: dict[str, nn.Linear]) -> None:
        self.acc = {
            n: torch.zeros_like(m.weight, dtype=torch.float32, memory_format=torch.contiguous_format)
            for n, m in targets.items()
        }
        self._buffers: dict[tuple, torch.Tensor] = {}

    def on_backward(self, name: str, x: torch.Tensor, grad_out: torch.Tensor, lengths: list[int]) -> None:
        acc = self.acc[name]
        if self.variant is SnipVariant.SUM:
            g = torch.cat([grad_out[b, :n] for b, n in enumerate(lengths)]).float()
            a = torch.cat([x[b, :n] for b, n in enumerate(lengths)]).float()
            acc.addmm_(g.t(), a)
            return
        buf = self._buffers.get(tuple(acc.shape))
        if buf is None:
            buf = self._buffers[tuple(acc.shape)] = torch.empty_like(acc)
        for b, n in enumerate(lengths):
            # dL_b/dW = g_b^T a_b over the positions that can influence sample b's loss.
            torch.mm(grad_out[b, :n].float().t(), x[b, :n].float(), out=buf)
            acc.add_(buf.abs_())

    def finalize(self, name: str, weight: torch.Tensor, num_samples: int) -> torch.Tensor:
        grad = self.acc[name].abs() if self.variant is SnipVariant.SUM else self.acc[name]
        return weight.detach().float().abs().mul_(grad)


class Magnitude(ScoringMethod):
    uses_data = False

    def finalize(self, name: str, weight: torch.Tensor, num_samples: int) -> torch.Tensor:
        return weight.detach().float().abs()


class Random(ScoringMethod):
    """Seeded uniform scores; targets draw from one generator in model order, so a seed fixes them all."""

    uses_data = False

    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)

    def finalize(self, name: str, weight: torch.Tensor, num_samples: int) -> torch.Tensor:
        return torch.rand(weight.shape, generator=self.generator, dtype=torch.float32)


def build_method(method: Method | str, *, seed: int = 0, snip_variant: SnipVariant | str = "per_sample") -> ScoringMethod:
    try:
        method = Method(method)
    except ValueError:
        raise ValueError(f"Unknown scoring method {method!r}; choose one of {[m.value for m in Method]}.") from None
    if method is Method.WANDA:
        return Wanda()
    if method is Method.SNIP:
        return Snip(snip_variant)
    if method is Method.MAGNITUDE:
        return Magnitude()
    return Random(seed)
