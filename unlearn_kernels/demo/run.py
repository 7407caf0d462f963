"""``unlearn-kernels demo``: world → base models → unlearning runs → evaluation → table.

1. The world (:mod:`.world`) and its tokenizer, cached (:mod:`.cache`).
2. The target model (every trained author) and the retain-only model of the forget split,
   cached (:mod:`.base`); each evaluated once (:func:`unlearn_kernels.eval.evaluate`, the
   reports cached beside the models): the retain-only model is every report's reference
   (forget quality, privacy leakage). The world is *valid* when the target's forget quality is
   ≤ 1e-3 and the retain-only model scored against itself gives 1.0.
3. Each method unlearns the target with LoRA through :func:`unlearn_kernels.train.loop.run`
   (one shared reference cache), the forget and retain answer probability probed every
   ``eval_every`` steps (``on_eval``), then is evaluated; the same run through the model's own
   ``labels=`` loss (``train.loss: unfused``) gives the time and memory to compare.
4. One printed table; ``results.csv``, ``results.json`` and two plots in ``out``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from unlearn_kernels._io import write_json_atomically, write_text_atomically
from unlearn_kernels.demo import METHOD_NAMES
from unlearn_kernels.demo.base import BaseSettings, default_cache_dir
from unlearn_kernels.demo.cache import WorldDir, base_model, prepare_world
from unlearn_kernels.demo.world import FORGET_SPLITS, RETAIN_OF, WorldSettings

log = logging.getLogger("unlearn_kernels")


@dataclass(frozen=True)
class MethodSettings:
    """One method's unlearning run: steps, learning rate, LoRA rank/alpha/modules, examples per
    set per step, the method's own keys."""

    steps: int = 60
    lr: float = 5e-4
    r: int = 8
    alpha: float = 16.0
    batch_size: int = 16
    target_modules: str | tuple[str, ...] = "all-linear"
    params: dict[str, Any] = field(default_factory=dict)


#: The calibrated settings (docs/demo.md): NGDiff's reach the goals on forget01; the baselines
#: run with the same steps, learning rate, LoRA and batch for a like-for-like row.
CALIBRATED = MethodSettings(steps=60, lr=5e-4, r=8, alpha=16.0, batch_size=16)
METHODS: dict[str, MethodSettings] = dict.fromkeys(METHOD_NAMES, CALIBRATED)

#: The keys of every results record (results.json / results.csv), in order.
RESULT_KEYS = (
    "method",
    "forget_quality",
    "model_utility",
    "forget_prob",
    "retain_prob",
    "forget_rouge",
    "retain_rouge",
    "privleak",
    "seconds",
    "peak_bytes",
    "unfused_seconds",
    "unfused_peak_bytes",
)


@dataclass(frozen=True)
class DemoSettings:
    """Everything a demo run depends on (the defaults are the recorded run's)."""

    forget_split: str = "forget01"
    methods: tuple[str, ...] = METHOD_NAMES
    world: WorldSettings = field(default_factory=WorldSettings)
    base: BaseSettings = field(default_factory=BaseSettings)
    method_settings: dict[str, MethodSettings] = field(default_factory=lambda: dict(METHODS))
    eval_every: int = 10
    probe_items: int = 64  # forget / retain items of the on_eval probe
    compare_unfused: bool = True
    eval_batch_size: int = 32
    max_new_tokens: int = 24
    seed: int = 0

    def __post_init__(self) -> None:
        if self.forget_split not in FORGET_SPLITS:
            raise ValueError(
                f"--forget-split must be one of {sorted(FORGET_SPLITS)}, got {self.forget_split!r}"
            )
        unknown = [m for m in self.methods if m not in METHOD_NAMES]
        if unknown or not self.methods:
            raise ValueError(f"--methods must be among {', '.join(METHOD_NAMES)}, got {unknown}")

    @classmethod
    def quick(cls, **overrides: Any) -> DemoSettings:
        """``--quick``: NGDiff alone (on forget01, the default split)."""
        return cls(**{"forget_split": "forget01", "methods": ("ngdiff",), **overrides})


@dataclass
class MethodResult:
    record: dict[str, Any]
    curve: list[dict[str, float]]


def _eval_options(settings: DemoSettings) -> dict[str, Any]:
    return {
        "batch_size": settings.eval_batch_size,
        "max_new_tokens": settings.max_new_tokens,
    }


def _load(model_dir: Path, adapter_dir: Path | None = None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
    return model.eval()


def _cached_report(model_dir: Path, data, tokenizer, settings: DemoSettings, progress: bool):
    """The base model's evaluation report on the split, cached beside the model."""
    from unlearn_kernels.eval import EvalReport, evaluate

    options = _eval_options(settings)
    name = f"eval-{data.forget_split}-b{options['batch_size']}-t{options['max_new_tokens']}.json"
    path = model_dir / name
    if path.is_file():
        try:
            return EvalReport.from_json(path.read_text(encoding="utf-8"))
        except ValueError as err:
            log.warning("%s is not usable (%s): evaluating again", path, err)
    report = evaluate(_load(model_dir), tokenizer, data, progress=progress, **options)
    write_text_atomically(path, report.to_json())
    return report


def _record(method: str, report, **extra: Any) -> dict[str, Any]:
    m = report.metrics
    record = {key: None for key in RESULT_KEYS}
    record.update(
        method=method,
        forget_quality=m.get("forget_quality"),
        model_utility=m["model_utility"],
        forget_prob=m["forget_prob"],
        retain_prob=m["retain_prob"],
        forget_rouge=m["forget_rouge"],
        retain_rouge=m["retain_rouge"],
        privleak=m.get("privleak"),
        forget_truth_ratio=m["forget_truth_ratio"],
    )
    record.update(extra)
    return record


def run_config(
    settings: DemoSettings,
    method: str,
    world: WorldDir,
    target_dir: Path,
    output_dir: Path,
    reference_dir: Path,
    *,
    loss: str = "fused",
):
    """The :class:`~unlearn_kernels.train.config.RunConfig` of one method's unlearning run."""
    from unlearn_kernels.train.config import validate_config

    m = settings.method_settings[method]
    return validate_config(
        {
            "model": str(target_dir),
            "data": {
                "forget": str(world.jsonl(settings.forget_split)),
                "retain": str(world.jsonl(RETAIN_OF[settings.forget_split])),
                "max_length": 64,
            },
            "method": {"name": method, **m.params},
            "adapter": {
                "kind": "lora",
                "r": m.r,
                "alpha": m.alpha,
                "target_modules": m.target_modules
                if isinstance(m.target_modules, str)
                else list(m.target_modules),
            },
            "train": {
                "steps": m.steps,
                "batch_size": m.batch_size,
                "lr": m.lr,
                "seed": settings.seed,
                "checkpoint_every": 0,
                "eval_every": settings.eval_every if loss == "fused" else 0,
                "loss": loss,
                "device": "cpu",
            },
            "reference": {"path": str(reference_dir)},
            "output_dir": str(output_dir),
        }
    )


def _probe(data, tokenizer, settings: DemoSettings):
    """``on_eval``: the forget and retain answer probability on ``probe_items`` of each."""
    from unlearn_kernels.eval import answer_probability

    forget = list(data.forget[: settings.probe_items])
    retain = list(data.retain[: settings.probe_items])
    size = settings.eval_batch_size

    def on_eval(step: int, model) -> dict[str, float]:
        return {
            "forget_prob": answer_probability(model, tokenizer, forget, batch_size=size),
            "retain_prob": answer_probability(model, tokenizer, retain, batch_size=size),
        }

    return on_eval


def unlearn_one(
    settings: DemoSettings,
    method: str,
    world: WorldDir,
    target_dir: Path,
    data,
    reference_report,
    runs_dir: Path,
    reference_dir: Path,
    progress: bool,
) -> MethodResult:
    """One method: the fused run (probed), its evaluation, and the unfused run's cost."""
    from unlearn_kernels.eval import evaluate
    from unlearn_kernels.train.loop import run

    out = runs_dir / method
    shutil.rmtree(out, ignore_errors=True)
    config = run_config(settings, method, world, target_dir, out, reference_dir)
    summary = run(config, progress=progress, on_eval=_probe(data, world.tokenizer, settings))
    curve = [
        {
            "step": m["step"],
            "forget_prob": m["eval/forget_prob"],
            "retain_prob": m["eval/retain_prob"],
        }
        for m in summary.metrics
        if "eval/forget_prob" in m
    ]
    seconds = sum(m.get("seconds", 0.0) for m in summary.metrics)
    model = _load(target_dir, summary.adapter_dir)
    report = evaluate(
        model,
        world.tokenizer,
        data,
        retain_reference=reference_report,
        progress=progress,
        **_eval_options(settings),
    )
    write_text_atomically(out / "report.json", report.to_json())
    extra = {"seconds": seconds, "peak_bytes": summary.peak_extra_bytes, "steps": summary.steps}
    if settings.compare_unfused:
        plain = runs_dir / f"{method}-unfused"
        shutil.rmtree(plain, ignore_errors=True)
        config = run_config(
            settings, method, world, target_dir, plain, reference_dir, loss="unfused"
        )
        base = run(config, progress=progress)
        extra["unfused_seconds"] = sum(m.get("seconds", 0.0) for m in base.metrics)
        extra["unfused_peak_bytes"] = base.peak_extra_bytes
    return MethodResult(_record(method, report, **extra), curve)


def run_demo(
    settings: DemoSettings,
    out: Path,
    cache_dir: Path | None = None,
    *,
    progress: bool = True,
    echo=print,
    command: str = "unlearn-kernels demo",
) -> dict[str, Any]:
    """The whole demo (module docstring); returns what ``results.json`` holds. ``command`` is
    recorded in ``results.md``."""
    from unlearn_kernels.eval import read_tofu

    started = time.perf_counter()
    out, cache = Path(out), Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    tick = time.perf_counter()
    world = prepare_world(settings.world, cache)
    target_dir, target_info = base_model(world, "target", settings.base, cache, progress=progress)
    retain_split = RETAIN_OF[settings.forget_split]
    retain_dir, retain_info = base_model(
        world, retain_split, settings.base, cache, progress=progress
    )
    timings["world_and_base_models"] = time.perf_counter() - tick

    tick = time.perf_counter()
    data = read_tofu(world.path, settings.forget_split)
    reference = _cached_report(retain_dir, data, world.tokenizer, settings, progress)
    retain_self = reference.against(reference)
    target = _cached_report(target_dir, data, world.tokenizer, settings, progress).against(
        reference
    )
    timings["base_evaluation"] = time.perf_counter() - tick
    validity = {
        "target_forget_quality": target.metrics["forget_quality"],
        "retain_only_self_forget_quality": retain_self.metrics["forget_quality"],
    }
    validity["valid"] = (
        validity["target_forget_quality"] <= 1e-3
        and validity["retain_only_self_forget_quality"] == 1.0
    )
    records = [_record("target", target), _record("retain_only", retain_self)]
    curves: dict[str, list[dict[str, float]]] = {}

    tick = time.perf_counter()
    reference_dir = cache / f"reference-{target_dir.name}-{settings.forget_split}"
    for method in settings.methods:
        result = unlearn_one(
            settings,
            method,
            world,
            target_dir,
            data,
            reference,
            out / "runs",
            reference_dir,
            progress,
        )
        records.append(result.record)
        curves[method] = result.curve
    timings["unlearning_and_evaluation"] = time.perf_counter() - tick
    timings["total"] = time.perf_counter() - started

    results = {
        "settings": _settings_tree(settings),
        "world_dir": str(world.path),
        "base_models": {
            "target": {"dir": str(target_dir), **_info(target_info)},
            "retain_only": {"dir": str(retain_dir), **_info(retain_info)},
        },
        "validity": validity,
        "records": records,
        "curves": curves,
        "timings": timings,
    }
    write_results(out, results)
    write_text_atomically(out / "results.md", results_markdown(results, command))
    echo(format_table(results))
    return results


def results_markdown(results: dict[str, Any], command: str) -> str:
    """``results.md``: the command, the table, the settings of each method, the timings."""
    lines = [f"Command: `{command}`", "", format_table(results), "", "Settings:", ""]
    for name in results["settings"]["methods"]:
        lines.append(f"- {name}: `{json.dumps(results['settings']['method_settings'][name])}`")
    base = results["settings"]["base"]
    lines.append(f"- base models: `{json.dumps(base)}`")
    timings = ", ".join(f"{k} {v:.0f} s" for k, v in results["timings"].items())
    lines += ["", f"Timings: {timings}."]
    return "\n".join(lines) + "\n"


def _info(info: dict[str, Any]) -> dict[str, Any]:
    return {k: info[k] for k in ("final_epoch_loss", "seconds", "cached") if k in info}


def _settings_tree(settings: DemoSettings) -> dict[str, Any]:
    tree = asdict(settings)
    tree["methods"] = list(settings.methods)
    return tree


# ---- output ---------------------------------------------------------------------------------


def write_results(out: Path, results: dict[str, Any]) -> None:
    """``results.json``, ``results.csv`` and the two plots, each written atomically."""
    write_json_atomically(out / "results.json", results)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=RESULT_KEYS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(results["records"])
    write_text_atomically(out / "results.csv", buffer.getvalue())
    plot_curves(results, out / "probability_over_steps.png")
    plot_tradeoff(results, out / "forget_quality_vs_utility.png")


def _fmt(value: Any, kind: str = "g") -> str:
    if value is None:
        return "—"
    if kind == "bytes":
        return f"{value / 2**20:.1f} MiB"
    if kind == "s":
        return f"{value:.1f}"
    if isinstance(value, float) and value != 0 and abs(value) < 1e-3:
        return f"{value:.1e}"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def format_table(results: dict[str, Any]) -> str:
    """The printed table (markdown) and the validity line."""
    head = (
        "| method | forget quality | model utility | forget prob | retain prob | forget ROUGE "
        "| retain ROUGE | privleak | unlearn s (fused / labels=) | peak (fused / labels=) |"
    )
    lines = [head, "| " + " | ".join(["---"] + ["---:"] * 9) + " |"]
    for r in results["records"]:
        cost = f"{_fmt(r['seconds'], 's')} / {_fmt(r['unfused_seconds'], 's')}"
        peak = f"{_fmt(r['peak_bytes'], 'bytes')} / {_fmt(r['unfused_peak_bytes'], 'bytes')}"
        if r["seconds"] is None:
            cost = peak = "—"
        lines.append(
            f"| {r['method']} | {_fmt(r['forget_quality'])} | {_fmt(r['model_utility'])} | "
            f"{_fmt(r['forget_prob'])} | {_fmt(r['retain_prob'])} | {_fmt(r['forget_rouge'])} | "
            f"{_fmt(r['retain_rouge'])} | {_fmt(r['privleak'])} | {cost} | {peak} |"
        )
    v = results["validity"]
    lines += [
        "",
        f"World check: target forget quality {_fmt(v['target_forget_quality'])} (must be ≤ 1e-3), "
        f"retain-only against itself {_fmt(v['retain_only_self_forget_quality'])} (must be 1.0): "
        + ("valid." if v["valid"] else "NOT VALID."),
        f"Total {results['timings']['total']:.0f} s.",
    ]
    return "\n".join(lines)


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(buffer.getvalue())
    tmp.replace(path)


def plot_curves(results: dict[str, Any], path: Path) -> None:
    """Forget (solid) and retain (dashed) answer probability over the unlearning steps."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (method, curve) in enumerate(results["curves"].items()):
        steps = [c["step"] for c in curve]
        color = colors[i % len(colors)]
        ax.plot(
            steps, [c["forget_prob"] for c in curve], "-", color=color, label=f"{method} forget"
        )
        ax.plot(
            steps, [c["retain_prob"] for c in curve], "--", color=color, label=f"{method} retain"
        )
    only = next(r for r in results["records"] if r["method"] == "retain_only")
    ax.axhline(only["forget_prob"], color="gray", lw=0.8, ls=":", label="retain-only, forget")
    ax.set_xlabel("unlearning step")
    ax.set_ylabel("answer probability (probe)")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("Forget vs retain answer probability")
    _save(fig, path)
    plt.close(fig)


def plot_tradeoff(results: dict[str, Any], path: Path) -> None:
    """Forget quality (log scale) against model utility, one point per model."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for r in results["records"]:
        fq = max(r["forget_quality"], 1e-30)
        ax.scatter(fq, r["model_utility"], s=36)
        ax.annotate(
            r["method"],
            (fq, r["model_utility"]),
            fontsize=8,
            xytext=(4, 3),
            textcoords="offset points",
        )
    ax.set_xscale("log")
    ax.axvline(0.05, color="gray", lw=0.8, ls=":")
    ax.set_xlabel("forget quality (KS p-value vs retain-only)")
    ax.set_ylabel("model utility")
    ax.set_title("Forget quality vs model utility")
    _save(fig, path)
    plt.close(fig)


def check_results(results: dict[str, Any]) -> list[str]:
    """The calibration goals NGDiff misses (empty when all are met)."""
    rows = {r["method"]: r for r in results["records"]}
    if "ngdiff" not in rows:
        return []
    ng, target, only = rows["ngdiff"], rows["target"], rows["retain_only"]
    missed = []
    if not ng["forget_quality"] >= 0.05:
        missed.append(f"forget quality {ng['forget_quality']:.3g} < 0.05")
    if not ng["model_utility"] >= 0.9 * target["model_utility"]:
        missed.append(f"model utility {ng['model_utility']:.3f} < 0.9 × target's")
    ratio = ng["forget_prob"] / only["forget_prob"]
    if not 1 / 1.5 <= ratio <= 1.5:
        missed.append(f"forget probability {ratio:.2f} × the retain-only model's")
    return missed
