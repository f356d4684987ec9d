"""How far did the safety-critical set move? Compare two mask sets (and optionally scores and weights).

``compare_masks(before, after)`` answers, per target weight and overall: how similar the two critical
sets are (Jaccard, overlap), how many entries became critical, how many of those were trainable
(unlocked) during fine-tuning, how the score rankings correlate (Spearman), and, given the base and the
fine-tuned model, how much locked and unlocked entries changed (locked entries must not change at all).
The result is a :class:`DriftReport`: ``drift.json`` (schema in docs/drift_report.md), ``drift.md`` and
PNG plots. Definitions, with A = before, B = after, L = the lock mask used in training (``before``
unless ``locked`` is given):

- Jaccard = |A∩B| / |A∪B|, and 1.0 when both are empty (nothing moved).
- overlap = |A∩B| / |A|, and 1.0 when A is empty (vacuously kept).
- new critical = |B \\ A|; new critical & unlocked = |B \\ A \\ L|; lost critical = |A \\ B|.
- Spearman: Pearson correlation of the average ranks (ties share the mean rank) of the two score tensors,
  over all entries of a weight when it has at most ``spearman_max_entries`` entries, otherwise over a
  uniform sample without replacement of that many entries, drawn by ``numpy.random.default_rng`` seeded
  with ``(seed, crc32(name))`` (so a weight's sample does not depend on the other weights). Pairs where
  either score is NaN are left out; ``None`` when fewer than 2 pairs remain or a side is constant.
- Drift: |W_ft - W_base| over locked and unlocked entries (computed in float64), and how many entries'
  raw bits differ (so -0.0 vs +0.0 and a changed NaN payload count as changed). A fine-tuned weight of
  another dtype is cast to the base dtype before its bits are compared.

Overall figures are sums over weights before dividing (micro averages); ``spearman_mean`` is the plain
mean of the per-weight values that are defined.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import tempfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .atomic import atomic_write
from .errors import MaskMismatchError

__all__ = ["DriftReport", "compare_masks", "spearman", "SCHEMA_VERSION"]

SCHEMA_VERSION = 1
PLOT_FILES = ("jaccard_by_depth.png", "overlap_by_depth.png", "by_module.png")

_DEPTH_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")
_ANY_INDEX_RE = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")
_COUNT_KEYS = ("entries", "locked_before", "locked_after", "intersection", "union",
               "new_critical", "new_critical_unlocked", "lost_critical")


def layer_depth(name: str) -> int | None:
    """Decoder block index in a parameter name ("model.layers.12.mlp.up_proj.weight" -> 12)."""
    match = _DEPTH_RE.search(name) or _ANY_INDEX_RE.search(name)
    return int(match.group(1)) if match else None


def module_type(name: str) -> str:
    """Last name component before ``.weight`` ("model.layers.0.self_attn.q_proj.weight" -> "q_proj")."""
    parts = name.split(".")
    if len(parts) > 1 and parts[-1] == "weight":
        parts = parts[:-1]
    return parts[-1]


# ---------------------------------------------------------------------------------------------- Spearman
def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks of a 1-D tensor, ties sharing their mean rank (float64)."""
    x = x.reshape(-1)
    n = x.numel()
    order = torch.argsort(x, stable=True)
    xs = x[order]
    starts = torch.ones(n, dtype=torch.bool)
    if n > 1:
        starts[1:] = xs[1:] != xs[:-1]
    group = torch.cumsum(starts, 0) - 1
    first = torch.nonzero(starts).reshape(-1).to(torch.float64)
    size = torch.bincount(group).to(torch.float64)
    ranks = torch.empty(n, dtype=torch.float64)
    ranks[order] = (first + (size - 1) / 2 + 1)[group]
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Spearman rank correlation of two equally long score vectors (average ranks for ties).
    NaN pairs are dropped; ``None`` when fewer than 2 pairs remain or either side is constant."""
    a = a.reshape(-1).to(torch.float64)
    b = b.reshape(-1).to(torch.float64)
    keep = ~(torch.isnan(a) | torch.isnan(b))
    a, b = a[keep], b[keep]
    if a.numel() < 2:
        return None
    ra, rb = average_ranks(a), average_ranks(b)
    ra -= ra.mean()
    rb -= rb.mean()
    denom = math.sqrt(float((ra * ra).sum()) * float((rb * rb).sum()))
    if denom == 0.0:
        return None
    return max(-1.0, min(1.0, float((ra * rb).sum()) / denom))


def spearman_sample(name: str, n: int, k: int, seed: int) -> np.ndarray | None:
    """Flat indices used for a weight with ``n`` entries when ``n > k`` (sorted); ``None`` means all."""
    if n <= k:
        return None
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    return np.sort(rng.choice(n, size=k, replace=False))


# ---------------------------------------------------------------------------------------------- helpers
def _names_and_check(before: Mapping, after: Mapping, label_a: str, label_b: str) -> list[str]:
    names_a, names_b = list(before), list(after)
    set_a, set_b = set(names_a), set(names_b)
    missing_b = [n for n in names_a if n not in set_b]
    missing_a = [n for n in names_b if n not in set_a]
    if missing_a or missing_b:
        raise MaskMismatchError(
            f"{label_a} and {label_b} cover different weights: only in {label_a}: {missing_b[:5]}"
            f"{' ...' if len(missing_b) > 5 else ''}; only in {label_b}: {missing_a[:5]}"
            f"{' ...' if len(missing_a) > 5 else ''}."
        )
    return names_a


def _shape(masks: Any, name: str) -> torch.Size:
    shape = getattr(masks, "shape", None)
    if callable(shape):
        return torch.Size(shape(name))
    return torch.Size(masks[name].shape)


def _bool_mask(masks: Mapping, name: str, label: str) -> torch.Tensor:
    mask = masks[name]
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise MaskMismatchError(f"{label}[{name!r}] is not a bool tensor (got {type(mask).__name__}"
                                f"{'' if not isinstance(mask, torch.Tensor) else ' of ' + str(mask.dtype)}).")
    return mask.detach().to("cpu")


def _weights(model: Any) -> Mapping[str, torch.Tensor]:
    if model is None:
        return {}
    if isinstance(model, Mapping):
        return model
    params = dict(model.named_parameters())
    for key, value in model.state_dict(keep_vars=True).items():
        params.setdefault(key, value)
    return params


def _weight(weights: Mapping[str, torch.Tensor], name: str, label: str, shape: torch.Size) -> torch.Tensor:
    if name not in weights:
        raise MaskMismatchError(
            f"{label} has no weight {name!r}. Pass plain models (merge a PEFT model with merge_and_unload() "
            "first) or a {name: tensor} mapping."
        )
    w = weights[name].detach()
    if w.shape != shape:
        raise MaskMismatchError(f"{label}[{name!r}] has shape {tuple(w.shape)}, the masks {tuple(shape)}.")
    return w.to("cpu")


_INT_OF_WIDTH = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits_differ(base: torch.Tensor, tuned: torch.Tensor) -> torch.Tensor:
    tuned = tuned.to(base.dtype)
    if base.dtype == torch.bool:
        return base != tuned
    int_dtype = _INT_OF_WIDTH[base.element_size()]
    return base.contiguous().view(int_dtype) != tuned.contiguous().view(int_dtype)


def _drift_stats(base: torch.Tensor, tuned: torch.Tensor, locked: torch.Tensor) -> dict[str, Any]:
    change = (tuned.to(torch.float64) - base.to(torch.float64)).abs()
    changed = _bits_differ(base, tuned)
    out: dict[str, Any] = {}
    for side, sel in (("locked", locked), ("unlocked", ~locked)):
        values = change[sel]
        count = int(values.numel())
        out[f"{side}_entries"] = count
        out[f"{side}_changed"] = int(torch.count_nonzero(changed & sel))
        out[f"{side}_max_abs_change"] = float(values.max()) if count else 0.0
        out[f"{side}_sum_abs_change"] = float(values.sum()) if count else 0.0
        out[f"{side}_mean_abs_change"] = out[f"{side}_sum_abs_change"] / count if count else 0.0
    return out


def _ratio(num: int, den: int, empty: float) -> float:
    return num / den if den else empty


def _finish_counts(row: dict[str, Any]) -> dict[str, Any]:
    row["jaccard"] = _ratio(row["intersection"], row["union"], 1.0)
    row["overlap"] = _ratio(row["intersection"], row["locked_before"], 1.0)
    return row


def _merge_drift(rows: list[dict | None]) -> dict[str, Any] | None:
    rows = [r for r in rows if r is not None]
    if not rows:
        return None
    out: dict[str, Any] = {}
    for side in ("locked", "unlocked"):
        count = sum(r[f"{side}_entries"] for r in rows)
        total = sum(r[f"{side}_sum_abs_change"] for r in rows)
        out[f"{side}_entries"] = count
        out[f"{side}_changed"] = sum(r[f"{side}_changed"] for r in rows)
        out[f"{side}_max_abs_change"] = max(r[f"{side}_max_abs_change"] for r in rows)
        out[f"{side}_sum_abs_change"] = total
        out[f"{side}_mean_abs_change"] = total / count if count else 0.0
    return out


def _aggregate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"layers": len(rows)}
    for key in _COUNT_KEYS:
        out[key] = sum(r[key] for r in rows)
    _finish_counts(out)
    values = [r["spearman"] for r in rows if r["spearman"] is not None]
    out["spearman_mean"] = sum(values) / len(values) if values else None
    out["spearman_layers"] = len(values)
    out["drift"] = _merge_drift([r["drift"] for r in rows])
    return out


def _jsonable(value: Any) -> Any:
    """Provenance and numbers as strict JSON: NaN/inf -> None, tuples -> lists, other objects -> str."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Size):
        return list(value)
    return str(value)


# ---------------------------------------------------------------------------------------------- report
@dataclass
class DriftReport:
    """The outcome of :func:`compare_masks`. ``layers`` holds one row per target weight, ``by_module``
    one row per module type, ``summary`` the totals; field meanings are in docs/drift_report.md."""

    summary: dict[str, Any]
    layers: list[dict[str, Any]]
    by_module: list[dict[str, Any]]
    settings: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        return _jsonable({
            "schema_version": SCHEMA_VERSION,
            "kind": "safety-peft drift report",
            "settings": self.settings,
            "provenance": self.provenance,
            "summary": self.summary,
            "by_module": self.by_module,
            "layers": self.layers,
        })

    def to_json(self) -> str:
        """Strict JSON (no NaN), keys in schema order, 2-space indent."""
        return json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "DriftReport":
        data = json.loads(text)
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(
                f"drift.json has schema_version {version!r}; this library reads {SCHEMA_VERSION}."
            )
        return cls(summary=data["summary"], layers=data["layers"], by_module=data["by_module"],
                   settings=data.get("settings", {}), provenance=data.get("provenance", {}))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "DriftReport":
        """Read ``drift.json`` (or a folder holding it)."""
        path = Path(path)
        if path.is_dir():
            path = path / "drift.json"
        return cls.from_json(path.read_text(encoding="utf-8"))

    # ------------------------------------------------------------------ Markdown
    def to_markdown(self) -> str:
        s = self.summary
        lines = ["# Safety mask drift report", ""]
        drift = s.get("drift")
        if drift is not None:
            if drift["locked_changed"] == 0:
                lines += ["Locked entries changed: **0** of "
                          f"{drift['locked_entries']:,} (the lock held).", ""]
            else:
                lines += [f"**WARNING: {drift['locked_changed']:,} locked entries changed** (max abs change "
                          f"{_fmt(drift['locked_max_abs_change'])}); the lock did not hold.", ""]
        lines += ["## Summary", "", "| metric | value |", "|---|---|"]
        rows = [
            ("weights compared", s["layers"]),
            ("entries", s["entries"]),
            ("critical before |A|", s["locked_before"]),
            ("critical after |B|", s["locked_after"]),
            ("Jaccard |A∩B|/|A∪B|", s["jaccard"]),
            ("overlap |A∩B|/|A|", s["overlap"]),
            ("became critical |B\\A|", s["new_critical"]),
            ("... of which unlocked in training", s["new_critical_unlocked"]),
            ("no longer critical |A\\B|", s["lost_critical"]),
            ("Spearman (mean over weights)", s["spearman_mean"]),
        ]
        if drift is not None:
            rows += [
                ("locked entries changed (must be 0)", drift["locked_changed"]),
                ("locked max abs change", drift["locked_max_abs_change"]),
                ("unlocked entries changed", drift["unlocked_changed"]),
                ("unlocked mean abs change", drift["unlocked_mean_abs_change"]),
                ("unlocked max abs change", drift["unlocked_max_abs_change"]),
            ]
        lines += [f"| {k.replace('|', chr(92) + '|')} | {_fmt(v)} |" for k, v in rows]

        lines += ["", "## By module type", "",
                  "| module | weights | Jaccard | overlap | became critical | ... unlocked "
                  "| Spearman (mean) |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in self.by_module:
            lines.append(f"| {r['module']} | {r['layers']} | {_fmt(r['jaccard'])} | {_fmt(r['overlap'])} | "
                         f"{_fmt(r['new_critical'])} | {_fmt(r['new_critical_unlocked'])} | "
                         f"{_fmt(r['spearman_mean'])} |")

        has_drift = any(r["drift"] is not None for r in self.layers)
        head = ("| weight | depth | module | critical before | critical after | Jaccard | overlap "
                "| became critical | ... unlocked | Spearman |")
        rule = "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"
        if has_drift:
            head += " locked changed | locked max abs | unlocked mean abs |"
            rule += "---:|---:|---:|"
        lines += ["", "## Per weight", "", head, rule]
        for r in self.layers:
            line = (f"| {r['name']} | {_fmt(r['depth'])} | {r['module']} | {_fmt(r['locked_before'])} | "
                    f"{_fmt(r['locked_after'])} | {_fmt(r['jaccard'])} | {_fmt(r['overlap'])} | "
                    f"{_fmt(r['new_critical'])} | {_fmt(r['new_critical_unlocked'])} | "
                    f"{_fmt(r['spearman'])} |")
            if has_drift:
                d = r["drift"] or {}
                line += (f" {_fmt(d.get('locked_changed'))} | {_fmt(d.get('locked_max_abs_change'))} | "
                         f"{_fmt(d.get('unlocked_mean_abs_change'))} |")
            lines.append(line)
        lines += ["", "## Plots", ""]
        lines += [f"![{name[:-4].replace('_', ' ')}]({name})" for name in PLOT_FILES]
        return "\n".join(lines) + "\n"

    # ------------------------------------------------------------------ plots
    def plot_pngs(self) -> dict[str, bytes]:
        """PNG bytes of the three plots, keyed by file name (matplotlib, Agg canvas, no pyplot state)."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator

        def render(fig: Figure) -> bytes:
            FigureCanvasAgg(fig)
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
            return buf.getvalue()

        with_depth = [r for r in self.layers if r["depth"] is not None]
        use_order = not with_depth
        points: dict[str, dict[int, dict[str, int]]] = {}
        for i, r in enumerate(self.layers if use_order else with_depth):
            x = i if use_order else r["depth"]
            acc = points.setdefault(r["module"], {}).setdefault(x, dict.fromkeys(("i", "u", "a"), 0))
            acc["i"] += r["intersection"]
            acc["u"] += r["union"]
            acc["a"] += r["locked_before"]

        out = {}
        for metric, title in (("jaccard", "Jaccard |A∩B| / |A∪B|"), ("overlap", "overlap |A∩B| / |A|")):
            fig = Figure(figsize=(7, 4))
            ax = fig.add_subplot()
            for module, by_x in sorted(points.items()):
                xs = sorted(by_x)
                ys = [_ratio(by_x[x]["i"], by_x[x]["u" if metric == "jaccard" else "a"], 1.0) for x in xs]
                ax.plot(xs, ys, marker="o", label=module)
            ax.set_xlabel("layer order" if use_order else "layer depth")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylabel(metric)
            ax.set_ylim(-0.02, 1.02)
            ax.set_title(f"{title} by depth")
            ax.grid(alpha=0.3)
            if points:
                ax.legend(fontsize="small", ncol=2)
            out[f"{metric}_by_depth.png"] = render(fig)

        fig = Figure(figsize=(7, 4))
        ax = fig.add_subplot()
        modules = [r["module"] for r in self.by_module]
        xs = np.arange(len(modules))
        ax.bar(xs - 0.2, [r["jaccard"] for r in self.by_module], width=0.4, label="Jaccard")
        ax.bar(xs + 0.2, [r["overlap"] for r in self.by_module], width=0.4, label="overlap")
        ax.set_xticks(xs, modules, rotation=30, ha="right")
        ax.set_ylim(0, 1.05)
        ax.set_title("by module type (all depths)")
        ax.legend(fontsize="small")
        out["by_module.png"] = render(fig)
        return out

    # ------------------------------------------------------------------ files
    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write drift.json, drift.md and the PNG plots into ``out_dir`` (each file atomically)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for name, data in self.plot_pngs().items():
            atomic_write(out / name, data)
        atomic_write(out / "drift.md", self.to_markdown().encode("utf-8"))
        atomic_write(out / "drift.json", self.to_json().encode("utf-8"))
        return out

    def card(self) -> str:
        """README.md for a Hub repo holding this report (metadata + the Markdown report)."""
        from .hub import card_text

        base = self.provenance.get("before", {}).get("base_model") if self.provenance else None
        return card_text(self.to_markdown(), base_model=base if isinstance(base, str) else None,
                         tags=["safety", "drift-report"])

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        revision: str | None = None,
        commit_message: str | None = None,
        token: str | bool | None = None,
        endpoint: str | None = None,
    ) -> str:
        """Push the report (files of :meth:`save` plus a README.md card) to a model repo; return the
        commit URL. Written to a temporary folder first, so nothing local changes."""
        from .hub import upload_artifact_folder

        with tempfile.TemporaryDirectory(prefix="safety-peft-drift-") as tmp:
            self.save(tmp)
            atomic_write(Path(tmp) / "README.md", self.card().encode("utf-8"))
            return upload_artifact_folder(tmp, repo_id, private=private, revision=revision,
                                          commit_message=commit_message or "Upload safety-peft drift report",
                                          token=token, endpoint=endpoint)


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3e}"
    return str(value)


# ---------------------------------------------------------------------------------------------- compare
def compare_masks(
    before: Mapping[str, torch.Tensor],
    after: Mapping[str, torch.Tensor],
    *,
    locked: Mapping[str, torch.Tensor] | None = None,
    scores_before: Mapping[str, torch.Tensor] | None = None,
    scores_after: Mapping[str, torch.Tensor] | None = None,
    base_model: Any = None,
    finetuned_model: Any = None,
    spearman_max_entries: int = 200_000,
    seed: int = 0,
) -> DriftReport:
    """Compare the critical sets ``before`` and ``after`` fine-tuning (``SafetyMasks`` or ``{name: bool
    tensor}`` mappings over the same weights and shapes); see the module docstring for definitions.

    ``locked`` is the lock mask used in training (default: ``before``). With ``scores_before`` and
    ``scores_after`` (e.g. ``SafetyScores``, covering at least the masked weights) each row gets a
    Spearman rank correlation; with ``base_model`` and ``finetuned_model`` (plain models, e.g. a merged
    PEFT model, or ``{param name: tensor}``) it gets the weight drift of locked vs unlocked entries.
    Raises :class:`~safety_peft.errors.MaskMismatchError` when names or shapes differ.
    """
    if (scores_before is None) != (scores_after is None):
        raise ValueError("Pass both scores_before and scores_after, or neither.")
    if (base_model is None) != (finetuned_model is None):
        raise ValueError("Pass both base_model and finetuned_model, or neither.")
    if spearman_max_entries < 2:
        raise ValueError(f"spearman_max_entries must be at least 2, got {spearman_max_entries}.")
    names = _names_and_check(before, after, "before", "after")
    lock = before if locked is None else locked
    if locked is not None:
        _names_and_check(before, locked, "before", "locked")
    for label, scores in (("scores_before", scores_before), ("scores_after", scores_after)):
        missing = [n for n in names if scores is not None and n not in scores]
        if missing:
            raise MaskMismatchError(
                f"{label} has no scores for {len(missing)} masked weights: {missing[:5]}."
            )
    base_w, tuned_w = _weights(base_model), _weights(finetuned_model)

    rows = []
    for name in names:
        shape = _shape(before, name)
        a = _bool_mask(before, name, "before")
        b = _bool_mask(after, name, "after")
        m = _bool_mask(lock, name, "locked")
        for label, t in (("after", b), ("locked", m)):
            if t.shape != a.shape:
                raise MaskMismatchError(
                    f"{label}[{name!r}] has shape {tuple(t.shape)}, before has {tuple(a.shape)}."
                )
        new = b & ~a
        row: dict[str, Any] = {
            "name": name,
            "depth": layer_depth(name),
            "module": module_type(name),
            "shape": list(shape),
            "entries": a.numel(),
            "locked_before": int(torch.count_nonzero(a)),
            "locked_after": int(torch.count_nonzero(b)),
            "intersection": int(torch.count_nonzero(a & b)),
            "union": int(torch.count_nonzero(a | b)),
            "new_critical": int(torch.count_nonzero(new)),
            "new_critical_unlocked": int(torch.count_nonzero(new & ~m)),
            "lost_critical": int(torch.count_nonzero(a & ~b)),
        }
        _finish_counts(row)

        row["spearman"] = row["spearman_entries"] = None
        row["spearman_sampled"] = False
        if scores_before is not None:
            sa = scores_before[name].detach().to("cpu").reshape(-1)
            sb = scores_after[name].detach().to("cpu").reshape(-1)
            if sa.numel() != a.numel() or sb.numel() != a.numel():
                raise MaskMismatchError(f"scores for {name!r} have {sa.numel()} and {sb.numel()} entries, "
                                        f"the masks {a.numel()}.")
            idx = spearman_sample(name, a.numel(), spearman_max_entries, seed)
            if idx is not None:
                idx_t = torch.from_numpy(idx)
                sa, sb = sa[idx_t], sb[idx_t]
            row["spearman"] = spearman(sa, sb)
            row["spearman_entries"] = int(sa.numel())
            row["spearman_sampled"] = idx is not None

        row["drift"] = None
        if base_model is not None:
            w0 = _weight(base_w, name, "base_model", shape)
            w1 = _weight(tuned_w, name, "finetuned_model", shape)
            row["drift"] = _drift_stats(w0, w1, m)
        rows.append(row)

    modules: dict[str, list[dict]] = {}
    for row in rows:
        modules.setdefault(row["module"], []).append(row)
    by_module = [{"module": mod, **_aggregate(group)} for mod, group in modules.items()]

    settings = {
        "lock_mask": "before" if locked is None else "given",
        "scores": scores_before is not None,
        "models": base_model is not None,
        "spearman_max_entries": spearman_max_entries,
        "seed": seed,
    }
    provenance = {
        "before": dict(getattr(before, "provenance", None) or {}),
        "after": dict(getattr(after, "provenance", None) or {}),
    }
    return DriftReport(summary=_aggregate(rows), layers=rows, by_module=by_module,
                       settings=settings, provenance=provenance)
