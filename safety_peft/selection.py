"""Selection: turn safety scores into lock masks (DESIGN.md, "Selection").

``top(S, p, group)`` keeps, in each comparison group, the ``ceil(p * n_g)`` entries with the largest score,
ties broken by the lower flat index. The result must be exact and reproducible, because a mask that
changes between two runs on the same scores would lock different weights and make experiments
incomparable.

Flat index order
    ``row``: the column index inside the row. ``layer``: row-major order inside the tensor. ``global``:
    the mapping's iteration order, then row-major order inside each tensor (the first tensor's entries
    come first). So, among equal scores, earlier tensors win a global tie.

Global and layer selection never sort the scores: an exact k-th value search (a radix select over the
float32 bit patterns, two passes of 16-bit bucket histograms) finds the threshold in a few linear
passes, which is an order of magnitude faster than sorting tens of millions of scores.

Scores of other floating dtypes are compared as float32 (the dtype scores are accumulated in); float64
values that only differ below float32 precision therefore tie.
"""

from __future__ import annotations

import copy
import functools
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from enum import Enum
from fractions import Fraction
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from safety_peft.errors import SelectionError
from safety_peft.masks import Granularity, SafetyMasks

__all__ = ["Granularity", "SelectionGroup", "num_selected", "select_critical", "top_mask"]


class SelectionGroup(str, Enum):
    """Which entries compete with each other for the ``ceil(p * n)`` places."""

    ROW = "row"  # each output row of each weight, as Wanda prunes
    LAYER = "layer"  # each weight matrix, as the released set-difference code does
    GLOBAL = "global"  # all target weights together


GroupLike = SelectionGroup | Literal["row", "layer", "global"]
GranularityLike = Granularity | Literal["weight", "neuron"]

_BUCKETS = 1 << 16  # 16-bit digits: two histogram passes cover a 32-bit key
_HALF = 1 << 15
_NAN_SUSPECT_HIGH = 0x7F80  # high 16 bits of +inf; everything at or above it is +inf or NaN
_SLAB = 1 << 22  # entries per concatenated slab in global selection (16 MiB of float32)
_NUMPY_BINCOUNT_MAX = 1 << 20  # below this many values numpy's bincount is cheaper than torch's


def _parse_choice(enum_cls: type[Enum], value: Any, what: str):
    """``enum_cls(value)``, or a SelectionError that lists the valid values."""
    try:
        return enum_cls(value)
    except ValueError:
        choices = ", ".join(repr(member.value) for member in enum_cls)
        raise SelectionError(f"unknown {what} {value!r}; choose one of {choices}") from None


def _parse_group(group: GroupLike) -> SelectionGroup:
    return _parse_choice(SelectionGroup, group, "selection group")


def _parse_granularity(granularity: GranularityLike) -> Granularity:
    return _parse_choice(Granularity, granularity, "granularity")


def _check_fraction(fraction: float, what: str) -> Fraction:
    """Validate a fraction and read it as the decimal it prints as.

    ``ceil(0.07 * 100)`` is 8 in float arithmetic (0.07 * 100 == 7.000000000000001); a user who asks
    for 7% of 100 entries expects 7, so the count is computed exactly from ``repr(fraction)``.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real):
        raise SelectionError(
            f"{what} must be a number in [0, 1], got {fraction!r} ({type(fraction).__name__})"
        )
    value = float(fraction)
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        raise SelectionError(
            f"{what} must be a fraction in [0, 1] (e.g. 0.03 locks 3% of the entries), got {fraction!r}"
        )
    return Fraction(repr(value))


def num_selected(fraction: float, n: int) -> int:
    """``ceil(fraction * n)``, computed exactly on the decimal value of ``fraction``."""
    return math.ceil(_check_fraction(fraction, "fraction") * n)


def _as_float32(name: str, scores: Tensor) -> Tensor:
    if not isinstance(scores, Tensor):
        raise SelectionError(f"scores for {name!r} must be a torch.Tensor, got {type(scores).__name__}")
    if scores.dtype == torch.bool or scores.is_complex():
        raise SelectionError(f"scores for {name!r} must be real numbers, got dtype {scores.dtype}")
    return scores.detach().to(torch.float32)


def _raise_nan(name: str) -> None:
    raise SelectionError(
        f"scores for {name!r} contain NaN; selection needs a total order (did the scoring pass overflow "
        "or see an empty calibration set?)"
    )


def _check_no_nan(names: Sequence[str], flats: Sequence[Tensor]) -> None:
    for name, flat in zip(names, flats):
        if bool(torch.isnan(flat).any()):
            _raise_nan(name)


def _order_keys(flat: Tensor, signed: bool) -> Tensor:
    """int32 keys whose (signed) integer order is the float order of ``flat``.

    For non-negative floats the bit pattern already sorts like the value, so the key is a free view.
    With sign bits present, ``+ 0.0`` first turns -0.0 into +0.0 (they must tie), then the magnitude
    bits of negative numbers are flipped so that larger magnitudes sort lower.
    """
    if not signed:
        return flat.view(torch.int32)
    bits = (flat + 0.0).view(torch.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def _bincount(values: Tensor) -> np.ndarray:
    """A 65536-bucket histogram of ``values`` (ints in [0, 65536)) as a numpy array.

    The fixed-size histogram work is kept in numpy: torch's parallel kernels pay a per-call overhead
    (milliseconds on a busy CPU) that would dominate per-layer selection of small weights.
    """
    if values.device.type == "cpu" and values.numel() < _NUMPY_BINCOUNT_MAX:
        return np.bincount(values.numpy(), minlength=_BUCKETS).astype(np.int64, copy=False)
    return torch.bincount(values, minlength=_BUCKETS).cpu().numpy()


def _high_histogram(keys: Sequence[Tensor]) -> np.ndarray:
    hist = np.zeros(_BUCKETS, dtype=np.int64)
    for key in keys:
        if key.numel():
            hist += _bincount((key >> 16).add_(_HALF))  # high 16 bits, shifted to [0, 65536)
    return hist


def _kth_from_top(hist: np.ndarray, k: int) -> tuple[int, int]:
    """The bucket holding the k-th largest entry, and how many entries lie in higher buckets."""
    from_top = np.cumsum(hist[::-1])
    j = int(np.searchsorted(from_top, k, side="left"))
    above = int(from_top[j - 1]) if j > 0 else 0
    return _BUCKETS - 1 - j, above


def _radix_top_k(flats: Sequence[Tensor], k: int, check_nan: Callable[[], None]) -> list[Tensor]:
    """Exact top-k over the concatenation of ``flats`` (ties -> lower concatenated index).

    ``check_nan`` raises a SelectionError naming the tensor when NaN is present; it runs only when
    the histogram cannot rule NaN out.

    Pass 1 histograms the high 16 bits of every key to find the bucket holding the k-th largest
    entry; pass 2 histograms the low 16 bits of that bucket's few entries to find the exact threshold
    key; entries equal to the threshold are then taken in concatenated (flat index) order.
    """
    n = sum(f.numel() for f in flats)
    if k <= 0 or k >= n:
        check_nan()
        return [torch.full_like(f, k > 0, dtype=torch.bool) for f in flats]

    signed = False
    keys = [_order_keys(f, signed) for f in flats]
    hist = _high_histogram(keys)
    if int(hist[:_HALF].sum()) > 0:  # sign bits present: negative scores or -0.0
        signed = True
        keys = [_order_keys(f, signed) for f in flats]
        hist = _high_histogram(keys)
    # NaN can only live in the extreme buckets (next to +inf, or next to -inf once sign-flipped);
    # only look closer when one of them is occupied.
    nan_suspect = int(hist[_HALF + _NAN_SUSPECT_HIGH :].sum()) > 0
    if signed:
        nan_suspect = nan_suspect or int(hist[: _HALF - _NAN_SUSPECT_HIGH].sum()) > 0
    if nan_suspect:
        check_nan()

    bucket, above = _kth_from_top(hist, k)
    needed = k - above  # entries still needed from `bucket`, 1 <= needed <= hist[bucket]
    high = bucket - _HALF

    positions = [torch.nonzero((key >> 16) == high).view(-1) for key in keys]
    lows = torch.cat([key[pos] & 0xFFFF for key, pos in zip(keys, positions)])
    low_hist = _bincount(lows)
    low_threshold, low_above = _kth_from_top(low_hist, needed)
    ties_needed = needed - low_above

    is_tie = lows == low_threshold
    chosen = (lows > low_threshold) | (is_tie & (is_tie.cumsum(0) <= ties_needed))

    bucket_top = (high << 16) | 0xFFFF  # largest key inside the threshold bucket
    masks = []
    for key, pos, chosen_here in zip(keys, positions, torch.split(chosen, [p.numel() for p in positions])):
        mask = key > bucket_top
        mask[pos[chosen_here]] = True
        masks.append(mask)
    return masks


def _slabs(flats: Sequence[Tensor]) -> tuple[list[Tensor], list[list[int]]]:
    """Concatenate runs of small consecutive tensors into slabs of at least ``_SLAB`` entries.

    The radix passes then run a few large torch ops instead of several per weight: each op has a
    fixed cost (thread start-up, large on a busy CPU) that hundreds of layers would pay otherwise.
    Concatenation keeps the flat index order, so the result is unchanged.
    """
    slabs, sizes, run, run_size = [], [], [], 0
    for i, flat in enumerate(flats):
        run.append(flat)
        run_size += flat.numel()
        if run_size >= _SLAB or i == len(flats) - 1:
            slabs.append(run[0] if len(run) == 1 else torch.cat(run))
            sizes.append([f.numel() for f in run])
            run, run_size = [], 0
    return slabs, sizes


def _row_top(name: str, scores: Tensor, fraction: Fraction) -> Tensor:
    """Per-row top-k, vectorised over rows: a kthvalue threshold plus tie resolution by column."""
    if scores.dim() != 2:
        raise SelectionError(
            f"group 'row' needs 2-D weights, but scores for {name!r} have shape {tuple(scores.shape)}"
        )
    rows, cols = scores.shape
    k = math.ceil(fraction * cols)
    if k <= 0 or k >= cols or rows == 0:
        _check_no_nan([name], [scores])
        return torch.full_like(scores, k > 0, dtype=torch.bool)
    if bool(torch.isnan(scores).any()):
        _raise_nan(name)
    threshold = scores.kthvalue(cols - k + 1, dim=1, keepdim=True).values  # k-th largest per row
    above = scores > threshold
    ties_needed = k - above.sum(dim=1, keepdim=True)
    is_tie = scores == threshold
    return above | (is_tie & (is_tie.cumsum(dim=1) <= ties_needed))


def top_mask(scores: Mapping[str, Tensor], fraction: float, group: GroupLike) -> dict[str, Tensor]:
    """Mask the ``ceil(fraction * n_g)`` largest scores of each comparison group.

    Returns one bool tensor per name, of the score tensor's shape, ``True`` for selected entries.
    ``group`` is ``"row"`` (2-D tensors only), ``"layer"`` or ``"global"``; see the module docstring for
    the flat index order that breaks ties. Raises :class:`SelectionError` on NaN scores, a fraction
    outside [0, 1] or an unknown group.
    """
    group = _parse_group(group)
    exact_fraction = _check_fraction(fraction, "fraction")
    names = list(scores)
    tensors = [_as_float32(name, scores[name]) for name in names]

    if group is SelectionGroup.ROW:
        return {name: _row_top(name, t, exact_fraction) for name, t in zip(names, tensors)}
    if group is SelectionGroup.LAYER:
        out = {}
        for name, t in zip(names, tensors):
            flat = t.reshape(-1)
            k = math.ceil(exact_fraction * flat.numel())
            check_nan = functools.partial(_check_no_nan, [name], [flat])
            out[name] = _radix_top_k([flat], k, check_nan)[0].view(t.shape)
        return out
    flats = [t.reshape(-1) for t in tensors]
    k = math.ceil(exact_fraction * sum(f.numel() for f in flats))
    slabs, sizes = _slabs(flats)
    slab_masks = _radix_top_k(slabs, k, functools.partial(_check_no_nan, names, flats))
    masks = [m for slab_mask, s in zip(slab_masks, sizes) for m in torch.split(slab_mask, s)]
    return {name: m.view(t.shape) for name, t, m in zip(names, tensors, masks)}


def _row_scores(scores: Mapping[str, Tensor], names: Sequence[str], what: str) -> dict[str, Tensor]:
    """Neuron granularity: a row's score is the float32 sum of its entries' scores."""
    out = {}
    for name in names:
        t = _as_float32(name, scores[name])
        if t.dim() != 2:
            raise SelectionError(
                f"neuron granularity needs 2-D weights, but {what} for {name!r} have shape {tuple(t.shape)}"
            )
        out[name] = t.sum(dim=1)
    return out


def _check_same_layout(scores: Mapping[str, Tensor], utility_scores: Mapping[str, Tensor]) -> None:
    names, utility_names = list(scores), set(utility_scores)
    missing = [n for n in names if n not in utility_names]
    extra = sorted(utility_names - set(names))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing from the utility scores: {_few(missing)}")
        if extra:
            parts.append(f"only in the utility scores: {_few(extra)}")
        raise SelectionError(
            "safety and utility scores must cover the same weights (score both with the same "
            "target_modules); " + "; ".join(parts)
        )
    for name in names:
        a, b = tuple(scores[name].shape), tuple(utility_scores[name].shape)
        if a != b:
            raise SelectionError(
                f"shape of {name!r} is {a} in the safety scores but {b} in the utility scores"
            )


def _few(names: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def select_critical(
    scores: Mapping[str, Tensor],
    sparsity: float,
    *,
    utility_scores: Mapping[str, Tensor] | None = None,
    utility_sparsity: float = 0.0,
    group: GroupLike = "layer",
    granularity: GranularityLike = "weight",
) -> SafetyMasks:
    """Critical = top(S_safety, p) minus top(S_utility, q), both in the same group and granularity.

    The set difference (Wei et al. 2024) drops entries that matter for general utility too, so the
    lock isolates what is specific to safety. With ``granularity="neuron"`` whole output rows are
    ranked by their summed score and locked; the ``"row"`` group is then meaningless (a row would
    compete only with itself) and refused. The masks' provenance is the scores' provenance plus the
    selection settings, so an artifact says how it was made.
    """
    group = _parse_group(group)
    granularity = _parse_granularity(granularity)
    _check_fraction(sparsity, "sparsity")
    _check_fraction(utility_sparsity, "utility_sparsity")
    if granularity is Granularity.NEURON and group is SelectionGroup.ROW:
        raise SelectionError(
            "group 'row' cannot be combined with neuron granularity (each row would compete only with "
            "itself); use group 'layer' or 'global'"
        )
    if utility_scores is None and float(utility_sparsity) != 0.0:
        raise SelectionError("utility_sparsity is set but no utility_scores were given")
    names = list(scores)
    if not names:
        raise SelectionError("no scores to select from (the scores mapping is empty)")
    if utility_scores is not None:
        _check_same_layout(scores, utility_scores)

    shapes = {name: tuple(scores[name].shape) for name in names}
    if granularity is Granularity.NEURON:
        safety = _row_scores(scores, names, "safety scores")
    else:
        safety = {name: scores[name] for name in names}
    critical = top_mask(safety, sparsity, group)

    if utility_scores is not None:
        # Same name order as the safety scores, so global ties break the same way in both.
        if granularity is Granularity.NEURON:
            utility = _row_scores(utility_scores, names, "utility scores")
        else:
            utility = {name: utility_scores[name] for name in names}
        utility_top = top_mask(utility, utility_sparsity, group)
        critical = {name: critical[name] & ~utility_top[name] for name in names}

    provenance = copy.deepcopy(dict(getattr(scores, "provenance", None) or {}))
    provenance.update(
        sparsity=float(sparsity),
        utility_sparsity=float(utility_sparsity),
        group=group.value,
        granularity=granularity.value,
    )
    utility_provenance = getattr(utility_scores, "provenance", None) or {}
    if "data" in utility_provenance:
        provenance["utility_data"] = copy.deepcopy(utility_provenance["data"])
    return SafetyMasks(critical, granularity=granularity.value, shapes=shapes, provenance=provenance)
