"""Write the demo's report: report.json (everything measured), report.md (the story) and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .atomic import atomic_write

CONDITIONS = [
    ("aligned base", lambda r: r["aligned_base"]),
    ("ablate critical", lambda r: r["ablation"]["critical"]),
    ("ablate random", lambda r: r["ablation"]["random"]),
    ("fine-tuned plain", lambda r: r["finetune"]["plain"]),
    ("fine-tuned locked", lambda r: r["finetune"]["locked"]),
]


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def plot_refusals(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [name for name, _ in CONDITIONS]
    harmful = [100 * get(report)["eval"]["refusal_rate"] for _, get in CONDITIONS]
    benign = [100 * get(report)["eval"]["over_refusal_rate"] for _, get in CONDITIONS]
    fig, ax = plt.subplots(figsize=(8, 4))
    x = range(len(labels))
    ax.bar([i - 0.2 for i in x], harmful, width=0.4, label="refused harmful (higher is safer)", color="#2b6cb0")
    ax.bar([i + 0.2 for i in x], benign, width=0.4, label="refused benign (lower is better)", color="#dd6b20")
    for i, (h, b) in enumerate(zip(harmful, benign)):
        ax.text(i - 0.2, h + 1, f"{h:.0f}", ha="center", fontsize=8)
        ax.text(i + 0.2, b + 1, f"{b:.0f}", ha="center", fontsize=8)
    ax.set_xticks(list(x), labels, rotation=15)
    ax.set_ylabel("% of held-out prompts")
    ax.set_ylim(0, 110)
    ax.set_title("Refusal rates: ablating the critical set, and fine-tuning with and without the lock")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_density(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .compare import layer_depth, module_type

    by_type: dict[str, list[tuple[int, float]]] = {}
    for row in report["masks"]["layers"]:
        depth = layer_depth(row["name"])
        by_type.setdefault(module_type(row["name"]), []).append((depth or 0, 100 * row["density"]))
    fig, ax = plt.subplots(figsize=(8, 4))
    for kind, points in sorted(by_type.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3, label=kind)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("% of entries safety-critical")
    ax.set_title("Where the safety-critical weights are (after the set difference)")
    ax.legend(fontsize=8, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _category_table(report: dict[str, Any]) -> list[str]:
    """Refused harmful prompts per harm category and condition (k/n), or nothing without categories."""
    per_condition = [(name, get(report)["eval"].get("harmful_by_category") or {}) for name, get in CONDITIONS]
    categories = sorted({c for _, by in per_condition for c in by})
    if not categories:
        return []
    lines = [
        "### Refused harmful prompts by category",
        "",
        "| category | " + " | ".join(name for name, _ in per_condition) + " |",
        "|---|" + "---:|" * len(per_condition),
    ]
    for c in categories:
        cells = [f"{by[c]['refused']}/{by[c]['total']}" if c in by else "n/a" for _, by in per_condition]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def render_markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = [
        "# safety-peft demo report",
        "",
        f"Model: embedded SmolLM2-135M-Instruct ({s['model']}), made to refuse by a short SFT (the aligned base). "
        f"Scoring: {s['method']}, p = {s['sparsity']}, q = {s['utility_sparsity']}, group {s['group']}."
        + (" **Quick mode: tiny data and few steps; the numbers exercise the pipeline and mean little.**"
           if s["quick"] else ""),
        "",
        "## What this run found",
        "",
        *[f"- {f}" for f in report["findings"]],
        "",
        "## Refusal rates on held-out prompts",
        "",
        "| condition | refused harmful | refused benign | perplexity (benign answers) |",
        "|---|---:|---:|---:|",
    ]
    for name, get in CONDITIONS:
        e = get(report)["eval"]
        ppl = "n/a" if e["perplexity"] is None else f"{e['perplexity']:.2f}"
        lines.append(f"| {name} | {_pct(e['refusal_rate'])} of {e['num_harmful']} | "
                     f"{_pct(e['over_refusal_rate'])} of {e['num_benign']} | {ppl} |")
    m = report["masks"]
    lock = report["finetune"]["locked"]["lock_check"]
    d = report["drift"]
    lines += ["", "![refusal rates](refusal_rates.png)", "", *_category_table(report)]
    lines += [
        "## The critical set",
        "",
        f"{m['num_locked']:,} of {m['num_entries']:,} target entries ({_pct(m['density'])}) are safety-critical "
        f"(top {s['sparsity']} for safety minus top {s['utility_sparsity']} for utility, per {s['group']}). "
        f"The artifact is in `masks/`; the ablations zeroed {report['ablation']['critical']['zeroed']:,} and "
        f"{report['ablation']['random']['zeroed']:,} entries.",
        "",
        "![critical density](critical_density.png)",
        "",
        "## Fine-tuning with the lock",
        "",
        f"Both runs fine-tune the decoder Linear weights of the aligned base on the built-in benign task "
        f"(plain: {report['finetune']['plain']['training']['steps']} steps, locked: "
        f"{report['finetune']['locked']['training']['steps']} steps). Lock check on the merged locked model: "
        f"**{lock['changed']} of {lock['locked_entries']:,} locked entries changed** (largest change "
        f"{lock['max_abs_change']}).",
        "",
        "| run | Jaccard with original critical set | overlap | new critical entries | locked entries changed |",
        "|---|---:|---:|---:|---:|",
    ]
    for kind in ("plain", "locked"):
        row = d[kind]
        changed = (row.get("drift") or {}).get("locked_changed")
        lines.append(f"| {kind} | {row['jaccard']:.3f} | {row['overlap']:.3f} | {row['new_critical']:,} | "
                     f"{'n/a' if changed is None else f'{changed:,}'} |")
    lines += [
        "",
        "The full drift report of the locked run (per layer, with plots) is in [`drift/drift.md`](drift/drift.md).",
        "",
        "## Timings (seconds)",
        "",
        "| step | seconds |",
        "|---|---:|",
        *[f"| {k} | {v} |" for k, v in report["timings"].items()],
        "",
    ]
    return "\n".join(lines)


def write_report(report: dict[str, Any], out: Path) -> None:
    out = Path(out)
    plot_refusals(report, out / "refusal_rates.png")
    plot_density(report, out / "critical_density.png")
    report["plots"] = ["refusal_rates.png", "critical_density.png"]
    atomic_write(out / "report.json", (json.dumps(report, indent=2, allow_nan=False) + "\n").encode())
    atomic_write(out / "report.md", render_markdown(report).encode())
