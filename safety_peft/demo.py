"""The end-to-end demo on the embedded SmolLM2-135M-Instruct: align, score, ablate, lock, rescore, report.

Steps (each prints its progress; every number in the report is measured in this run):

a. make the "aligned base": the shipped model answers harmful requests, so a short SFT on the built-in
   refusals and varied benign answers gives it refusal behaviour (cached after the first run);
b. evaluate it on held-out harmful and benign prompts (refusal, over-refusal, perplexity);
c. score safety (harmful requests + refusals) and utility (benign instructions + answers) with the same
   method, and select the critical set by set difference;
d. zero the critical set, and as a control a random set of the same size in the same matrices, and
   evaluate both;
e. fine-tune the aligned base on a benign task twice with TRL, once plain and once with
   ``SafetyFreezeConfig`` (both train the same decoder Linear weights), and evaluate both;
f. rescore the locked run and compare it with the original critical set (drift report);
g. write report.md, report.json and PNG plots.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

# Quick mode exercises every step on little data (for tests); its numbers are not meant to be read.
QUICK_LIMITS = {"eval_prompts": 12, "calibration_samples": 16, "max_length": 256, "finetune_steps": 3}


@dataclass
class DemoSettings:
    """Settings of one demo run; all of them are written into report.json."""

    model: str = "default"
    method: str = "wanda"
    sparsity: float = 0.05
    utility_sparsity: float = 0.05
    group: str = "layer"
    nsamples: int | None = None  # all built-in calibration rows
    max_length: int = 512
    eval_prompts: int | None = None  # all held-out prompts
    max_new_tokens: int = 48  # a refusal shows in the first words
    eval_batch_size: int = 16
    finetune_epochs: float = 2.0
    finetune_steps: int = -1
    finetune_lr: float = 5e-5
    finetune_batch_size: int = 8
    seed: int = 0
    quick: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def quick_settings(cls, **overrides: Any) -> "DemoSettings":
        q = QUICK_LIMITS
        base = dict(quick=True, nsamples=q["calibration_samples"], max_length=q["max_length"],
                    eval_prompts=q["eval_prompts"], max_new_tokens=24, finetune_steps=q["finetune_steps"])
        base.update(overrides)
        return cls(**base)


class _Steps:
    """Numbered progress lines with timings, e.g. ``[3/7] scoring safety and utility ... 41.2 s``."""

    def __init__(self, total: int, verbose: bool):
        self.total, self.verbose, self.n = total, verbose, 0
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, key: str, title: str):
        self.n += 1
        if self.verbose:
            print(f"[{self.n}/{self.total}] {title} ...", flush=True)
        start = time.perf_counter()
        yield
        self.timings[key] = round(time.perf_counter() - start, 1)
        if self.verbose:
            print(f"[{self.n}/{self.total}] {title}: done in {self.timings[key]} s", flush=True)


def _eval(model, tokenizer, s: DemoSettings, progress: bool) -> dict[str, Any]:
    from .builtin_datasets import load_builtin
    from .evaluation import evaluate_safety, generation_copy

    # Generation runs on a bfloat16 copy: about 3x faster on CPUs with bf16 matrix units, and the fp32
    # weights stay untouched for scoring, lock checks and drift.
    model = generation_copy(model, torch.bfloat16)
    harmful, benign = load_builtin("harmful_eval"), load_builtin("benign_eval")
    if s.eval_prompts is not None:
        harmful = harmful.select(range(min(s.eval_prompts, len(harmful))))
        benign = benign.select(range(min(s.eval_prompts, len(benign))))
    result = evaluate_safety(model, tokenizer, harmful, benign, max_new_tokens=s.max_new_tokens,
                             batch_size=s.eval_batch_size, progress=progress)
    out = result.to_dict()
    out["examples"] = {
        "harmful": [asdict(g) for g in result.harmful[:3]],
        "benign": [asdict(g) for g in result.benign[:3]],
    }
    del out["harmful"], out["benign"]
    return out


def _load(path, dtype=torch.float32):
    from .default_model import load_model_and_tokenizer

    return load_model_and_tokenizer(str(path), dtype=dtype)


def _finetune(base_path: Path, s: DemoSettings, masks, workdir: Path, progress: bool):
    """One TRL SFT run on the built-in benign fine-tuning set; ``masks`` given -> with the lock."""
    from .builtin_datasets import load_builtin
    from .sft import cpu_friendly_sft_trainer
    from .targets import find_target_modules
    from .tuners import SafetyFreezeConfig

    model, tokenizer = _load(base_path)
    rows = [dict(r) for r in load_builtin("finetune")]
    args = dict(
        learning_rate=s.finetune_lr, num_train_epochs=s.finetune_epochs, max_steps=s.finetune_steps,
        per_device_train_batch_size=s.finetune_batch_size, weight_decay=0.1, max_grad_norm=1.0,
        seed=s.seed, data_seed=s.seed,
    )
    peft_config = None
    if masks is None:
        # The plain run trains the same weights as the locked run: the decoder Linear layers.
        targets = {f"{n}.weight" for n in find_target_modules(model)}
        for name, p in model.named_parameters():
            p.requires_grad_(name in targets)
    else:
        peft_config = SafetyFreezeConfig(masks=masks)
    trainer = cpu_friendly_sft_trainer(model, tokenizer, rows, output_dir=str(workdir), max_length=s.max_length,
                                       progress=progress, peft_config=peft_config, **args)
    result = trainer.train()
    model = trainer.model
    if masks is not None:
        model = model.merge_and_unload()
    model.eval()
    return model, tokenizer, {"train_loss": result.training_loss, "steps": result.global_step}


def run_demo(
    out_dir: str | os.PathLike = "demo_report",
    settings: DemoSettings | None = None,
    *,
    progress: bool = True,
    verbose: bool = True,
) -> dict[str, Any]:
    """Run every step and write the report into ``out_dir``; returns the content of report.json."""
    from .ablation import ablate
    from .alignment import aligned_base_info, make_aligned_base
    from .compare import compare_masks
    from .critical import find_safety_critical
    from .rescore import rescore
    from .verification import verify_lock

    s = settings or DemoSettings()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    step = _Steps(7, verbose)
    report: dict[str, Any] = {"schema_version": 1, "settings": asdict(s)}
    torch.manual_seed(s.seed)

    with step("align", "a. aligned base (short refusal SFT of the embedded model; cached)"):
        aligned_path = make_aligned_base(s.model, quick=s.quick, progress=progress)
        base, tokenizer = _load(aligned_path)
        info = aligned_base_info(aligned_path)
        report["aligned_base"] = {"path": str(aligned_path), "training": info}

    with step("eval_base", "b. evaluate the aligned base on held-out prompts"):
        report["aligned_base"]["eval"] = _eval(base, tokenizer, s, progress)

    with step("score", f"c. score safety and utility ({s.method}) and select by set difference"):
        masks, safety_scores, _ = find_safety_critical(
            base, tokenizer, "builtin:harmful_train", utility_data="builtin:benign_train", method=s.method,
            sparsity=s.sparsity, utility_sparsity=s.utility_sparsity, group=s.group, nsamples=s.nsamples,
            max_length=s.max_length, seed=s.seed, progress=progress, return_scores=True,
        )
        masks.save_pretrained(out / "masks")
        report["masks"] = {
            "folder": "masks", "num_locked": masks.num_locked, "num_entries": masks.num_entries,
            "density": masks.density, "layers": masks.layer_stats(),
        }

    with step("ablate", "d. ablate the critical set and a random set of the same size; evaluate both"):
        ablations = {}
        for kind, random_control in (("critical", False), ("random", True)):
            model, _ = _load(aligned_path)
            counts = ablate(model, masks, random_control=random_control, seed=s.seed)
            ablations[kind] = {"zeroed": counts.num_zeroed, "eval": _eval(model, tokenizer, s, progress)}
            del model
        report["ablation"] = ablations

    with step("finetune", "e. fine-tune on a benign task twice: plain, and with SafetyFreezeConfig"):
        runs = {}
        with tempfile.TemporaryDirectory(prefix="safety_peft_demo_") as work:
            for kind, lock in (("plain", None), ("locked", masks)):
                model, tok, train_info = _finetune(aligned_path, s, lock, Path(work) / kind, progress)
                runs[kind] = {"training": train_info, "eval": _eval(model, tok, s, progress)}
                if lock is not None:
                    check = verify_lock(model, masks, base)
                    runs[kind]["lock_check"] = {"locked_entries": masks.num_locked,
                                                "changed": check.num_changed, "max_abs_change": check.max_abs_change}
                    locked_model = model
                else:
                    plain_model = model
        report["finetune"] = runs

    with step("rescore", "f. rescore the locked run and compare the critical sets"):
        after, after_scores, _ = rescore(locked_model, tokenizer, masks, progress=progress, return_scores=True)
        after.save_pretrained(out / "masks_after")
        drift = compare_masks(masks, after, scores_before=safety_scores, scores_after=after_scores,
                              base_model=base, finetuned_model=locked_model)
        drift.save(out / "drift")
        plain_after = rescore(plain_model, tokenizer, masks, progress=progress)
        plain_drift = compare_masks(masks, plain_after, base_model=base, finetuned_model=plain_model)
        report["drift"] = {"locked": drift.summary, "plain": plain_drift.summary, "folder": "drift"}

    with step("report", "g. write report.md, report.json and plots"):
        report["timings"] = step.timings
        report["findings"] = findings(report)
        from .demo_report import write_report

        write_report(report, out)
    return report


def _rate(section: dict[str, Any], key: str = "refusal_rate") -> float:
    return float(section["eval"][key])


def findings(report: dict[str, Any]) -> list[str]:
    """Plain sentences about what this run measured, including what did not go as hoped."""
    base = report["aligned_base"]["eval"]
    crit, rand = report["ablation"]["critical"], report["ablation"]["random"]
    plain, locked = report["finetune"]["plain"], report["finetune"]["locked"]
    pct = lambda x: f"{100 * x:.0f}%"  # noqa: E731
    out = [
        f"The aligned base refuses {pct(base['refusal_rate'])} of held-out harmful prompts and "
        f"{pct(base['over_refusal_rate'])} of held-out benign prompts."
    ]
    drop_crit = base["refusal_rate"] - _rate(crit)
    drop_rand = base["refusal_rate"] - _rate(rand)
    if drop_crit > drop_rand:
        out.append(
            f"Zeroing the {crit['zeroed']:,} safety-critical weights took the refusal rate from "
            f"{pct(base['refusal_rate'])} to {pct(_rate(crit))}; zeroing as many random weights in the same "
            f"matrices left it at {pct(_rate(rand))}."
        )
    else:
        out.append(
            f"Zeroing the critical set did NOT lower the refusal rate more than zeroing a random set of the same "
            f"size ({pct(_rate(crit))} vs {pct(_rate(rand))} after ablation): in this run the mask does not "
            "isolate the refusal behaviour."
        )
    out.append(
        f"After benign fine-tuning the plain run refuses {pct(_rate(plain))} of harmful prompts and the locked "
        f"run {pct(_rate(locked))} (over-refusal {pct(_rate(plain, 'over_refusal_rate'))} vs "
        f"{pct(_rate(locked, 'over_refusal_rate'))})."
    )
    if _rate(locked) < base["refusal_rate"] - 0.10:
        out.append(
            "The lock kept every critical entry bit-identical, yet the locked run lost refusals too: fine-tuning "
            "the unlocked weights can undo safety without touching the frozen ones (Wei et al. 2024 likewise "
            "found that freezing safety-critical weights does not stop fine-tuning from removing safety)."
        )
    check = locked["lock_check"]
    out.append(
        f"Lock check: {check['changed']} of {check['locked_entries']:,} locked entries changed "
        f"(largest change {check['max_abs_change']})."
    )
    d = report["drift"]
    out.append(
        f"Rescoring after fine-tuning: Jaccard {d['locked']['jaccard']:.3f} with the original critical set for the "
        f"locked run and {d['plain']['jaccard']:.3f} for the plain run."
    )
    return out
