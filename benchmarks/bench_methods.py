"""Benchmark: one unlearning step through the fused losses against the same step through the
model's own logits (``train.loss: unfused``: Hugging Face's ``labels=`` loss, ``F.kl_div``).

A Llama-shaped model built from a config (default d=512, 4 layers, V=128256, untied head),
a word-level tokenizer over V words, and random forget/retain sets of ``--seq``-token examples
with ``--prompt`` of them prompt tokens; LoRA r=8 on every linear layer (or nf4 QLoRA), fp32,
batch ``--batch`` per set. Each configuration is a run config driven by the package's own loop
(:class:`unlearn_kernels.train.loop.UnlearningRun`):

* memory jobs, each in a fresh process: one warm-up step, then the peak resident memory of
  ``--mem-steps`` more steps above the level before them (model, data and caches excluded);
* time jobs, one process per configuration: a fused and an unfused run built side by side and
  stepped in alternation (``--rounds`` rounds after one warm-up step each), so both sides of
  the ratio see the same load; NGDiff's GeN probe (every 4 steps) falls on the same rounds.

    python -m benchmarks.bench_methods                    # → results/methods.md (+ .json)
    python -m benchmarks.bench_methods --vocab 500 --d 32 --seq 24 --out /tmp/m.md   # tiny
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import statistics
import sys
import time
from pathlib import Path

from benchmarks.harness import fmt_bytes, run_isolated

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "methods.md"
SCRATCH = ROOT / "benchmarks" / ".scratch" / "methods"
#: configuration → (method, adapter kind)
CONFIGS = {
    "ngdiff": ("ngdiff", "lora"),
    "yao": ("yao", "lora"),
    "ngdiff_qlora": ("ngdiff", "qlora"),
}


def world_dir(args: argparse.Namespace) -> Path:
    return SCRATCH / f"V{args.vocab}-d{args.d}-L{args.layers}-T{args.seq}-P{args.prompt}"


def make_world(args: argparse.Namespace) -> Path:
    """Model directory (with tokenizer) and forget/retain JSONL, written once per shape."""
    root = world_dir(args)
    if (root / "done").is_file():
        return root
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["[PAD]", "[BOS]", "[EOS]", "[UNK]"] + [f"t{i}" for i in range(args.vocab - 4)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.d,
        intermediate_size=int(2.6875 * args.d) // 8 * 8,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.d // 64),
        num_key_value_heads=max(1, args.d // 64),
        max_position_embeddings=2 * args.seq,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(root / "model")
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="[BOS]", eos_token="[EOS]", pad_token="[PAD]"
    ).save_pretrained(root / "model")
    rng = random.Random(0)
    # [BOS] + prompt + response + [EOS] = seq tokens, `prompt` of them (BOS included) the prompt
    n_prompt, n_response = args.prompt - 1, args.seq - args.prompt - 1
    for split in ("forget", "retain"):
        with open(root / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for _ in range(4 * args.batch):
                text = [rng.choice(words[4:]) for _ in range(n_prompt + n_response)]
                record = {
                    "prompt": " ".join(text[:n_prompt]),
                    "response": " ".join(text[n_prompt:]),
                }
                f.write(json.dumps(record) + "\n")
    (root / "done").write_text("")
    return root


def run_config(args: argparse.Namespace, name: str, loss: str, out: Path):
    from unlearn_kernels.train.config import validate_config

    method, kind = CONFIGS[name]
    world = world_dir(args)
    return validate_config(
        {
            "model": str(world / "model"),
            "data": {
                "forget": str(world / "forget.jsonl"),
                "retain": str(world / "retain.jsonl"),
                "max_length": args.seq,
            },
            "method": {"name": method},
            "adapter": {"kind": kind, "r": 8, "target_modules": "all-linear"},
            "train": {
                "steps": max(args.mem_steps, args.rounds + 1),
                "batch_size": args.batch,
                "checkpoint_every": 0,
                "loss": loss,
                "device": "cpu",
            },
            "reference": {"path": str(world / f"reference-{kind}")},
            "output_dir": str(out),
        }
    )


def memory_worker(args: argparse.Namespace, name: str, loss: str) -> dict:
    """One warm-up step (weights paged in, allocator warm), then the peak of ``--mem-steps``
    steps above the resident size before them."""
    from unlearn_kernels._memory import peak_bytes, reset_peak
    from unlearn_kernels.train.loop import UnlearningRun

    out = world_dir(args) / f"run-{name}-{loss}"
    state = UnlearningRun(run_config(args, name, loss, out), out, False, None)
    state.build()
    state.step(0)
    base = reset_peak()
    seconds, logged = [], {}
    for step in range(1, args.mem_steps + 1):
        start = time.perf_counter()
        logged = state.step(step)
        seconds.append(time.perf_counter() - start)
    return {
        "peak_extra_bytes": peak_bytes() - base,
        "peak_bytes": peak_bytes(),
        "step_seconds": seconds,
        "last": logged,
    }


def time_worker(args: argparse.Namespace, name: str) -> dict:
    import torch

    from unlearn_kernels.train.loop import UnlearningRun

    runs = {}
    for loss in ("fused", "unfused"):
        out = world_dir(args) / f"time-{name}-{loss}"
        runs[loss] = UnlearningRun(run_config(args, name, loss, out), out, False, None)
        runs[loss].build()
    times: dict[str, list[float]] = {"fused": [], "unfused": []}
    values: dict[str, list[dict]] = {"fused": [], "unfused": []}
    for step in range(args.rounds + 1):
        for loss, state in runs.items():
            start = time.perf_counter()
            logged = state.step(step)
            if step:  # step 0 warms up
                times[loss].append(time.perf_counter() - start)
            values[loss].append(logged)
    ratios = [f / u for f, u in zip(times["fused"], times["unfused"], strict=True)]
    return {
        "times": times,
        "ratio_median": statistics.median(ratios),
        "ratio_of_minima": min(times["fused"]) / min(times["unfused"]),
        "threads": torch.get_num_threads(),
        "first_step": {loss: v[0] for loss, v in values.items()},
    }


def worker(argv: list[str]) -> None:
    parser = build_parser()
    parser.add_argument("job")
    parser.add_argument("config")
    args = parser.parse_args(argv)
    if args.job == "time":
        report = time_worker(args, args.config)
    else:
        report = memory_worker(args, args.config, args.job)
    print(json.dumps(report))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512, help="tokens per example")
    parser.add_argument("--prompt", type=int, default=205, help="prompt tokens per example")
    parser.add_argument("--batch", type=int, default=4, help="examples per set per step")
    parser.add_argument("--mem-steps", type=int, default=2, help="steps of each memory job")
    parser.add_argument("--rounds", type=int, default=4, help="timed rounds of the time job")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    make_world(args)
    shape = [
        f"--{k}={getattr(args, k.replace('-', '_'))}"
        for k in ("vocab", "d", "layers", "seq", "prompt", "batch", "mem-steps", "rounds")
    ]
    results: dict[str, dict] = {}
    for name in args.configs:
        for job in ("fused", "unfused", "time"):
            print(f"{name}: {job} ...", file=sys.stderr, flush=True)
            results[f"{name}/{job}"] = run_isolated(
                "benchmarks.bench_methods", ["--worker", *shape, job, name]
            )
    command = "python -m benchmarks.bench_methods " + shlex.join(
        [*shape, "--configs", *args.configs]
    )
    write_page(args, results, command)
    failed = [key for key, r in results.items() if "error" in r]
    for key in failed:
        print(f"{key} failed: {results[key]['error']}", file=sys.stderr)
    return 1 if failed else 0


def write_page(args: argparse.Namespace, results: dict, command: str) -> None:
    import torch

    lines = [
        "# One unlearning step: fused losses vs the model's own logits (CPU)",
        "",
        f"Llama-shaped model, d={args.d}, {args.layers} layers, V={args.vocab} (untied head), "
        f"LoRA r=8 on all linear layers (QLoRA: nf4 base), fp32; batch {args.batch} × "
        f"{args.seq} tokens per set, {args.prompt} prompt tokens each "
        f"({args.prompt / args.seq:.0%}); {torch.get_num_threads()} threads. Fused = the "
        "package's loop with the fused ops; unfused = the same loop with `train.loss: unfused` "
        "(Hugging Face's `labels=` loss on materialised logits, `F.kl_div` for the KL).",
        "",
        f"Command: `{command}`",
        "",
        "| configuration | peak above the start of the steps: fused | unfused | fused / unfused "
        "| step time fused / unfused (median of per-round ratios) | of minima | fused s | "
        "unfused s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in args.configs:
        fused, unfused, timed = (results[f"{name}/{j}"] for j in ("fused", "unfused", "time"))
        if any("error" in r for r in (fused, unfused, timed)):
            lines.append(f"| {name} | failed | | | | | | |")
            continue
        mem = fused["peak_extra_bytes"] / unfused["peak_extra_bytes"]
        lines.append(
            f"| {name} | {fmt_bytes(fused['peak_extra_bytes'])} | "
            f"{fmt_bytes(unfused['peak_extra_bytes'])} | {mem:.3f} | "
            f"{timed['ratio_median']:.3f} | {timed['ratio_of_minima']:.3f} | "
            f"{statistics.median(timed['times']['fused']):.2f} | "
            f"{statistics.median(timed['times']['unfused']):.2f} |"
        )
    lines += [
        "",
        "Targets (issue 7): peak memory ≤ 0.5 ×, step time ≤ 0.9 × the unfused step.",
        "",
        "The first step's logged terms (fused vs unfused) are in the JSON beside this page.",
    ]
    args.out.write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(
        json.dumps({"command": command, "results": results}, indent=1)
    )


if __name__ == "__main__":
    if "--worker" in sys.argv:
        sys.argv.remove("--worker")
        worker(sys.argv[1:])
    else:
        raise SystemExit(main())
