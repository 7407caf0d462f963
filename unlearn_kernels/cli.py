"""The ``unlearn-kernels`` command.

``unlearn-kernels run --config FILE.yaml [--set key=value ...] [--resume]`` unlearns: it trains
an adapter with one of :mod:`unlearn_kernels.methods` as the run config says (see
:mod:`unlearn_kernels.train.config` and :mod:`unlearn_kernels.train.loop`);
``unlearn-kernels run --print-config METHOD`` prints a complete, commented default config.

``unlearn-kernels cache --model DIR --data FILE --out DIR [options]`` runs the frozen
reference model once over a data set and writes a reference cache (see
:mod:`unlearn_kernels.train.reference_cache`). ``--data`` is a ``.jsonl`` file of
``{"prompt": ..., "response": ...}`` lines (with ``--tokenizer``) or a pre-tokenised
``.safetensors`` file (see :mod:`unlearn_kernels.data.formats`). Models and tokenizers are read
from local paths only.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

_MODEL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _load_model(path: str, dtype: str, load_in_4bit: bool) -> torch.nn.Module:
    """A local transformers causal LM, optionally quantised to bitsandbytes nf4."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if not Path(path).is_dir():
        raise ValueError(f"--model {path!r} is not a local model directory")
    kwargs = {"dtype": _MODEL_DTYPES[dtype], "local_files_only": True}
    if load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=_MODEL_DTYPES[dtype],
        )
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


def _cache(args: argparse.Namespace) -> int:
    from unlearn_kernels.data.formats import load_pairs, load_tokenizer
    from unlearn_kernels.train.reference_cache import CacheSettings, build_reference_cache

    settings = CacheSettings(
        topk=args.topk,
        temperature=args.temperature,
        store_hidden=not args.no_hidden,
        store_label_logprob=not args.no_label_logprob,
        hidden_dtype=args.hidden_dtype,
    )
    tokenizer = None if args.tokenizer is None else load_tokenizer(args.tokenizer)
    data = load_pairs(
        args.data,
        tokenizer,
        bos_token_id=args.bos_id,
        eos_token_id=args.eos_id,
        max_length=args.max_length,
    )
    model = _load_model(args.model, args.model_dtype, args.load_in_4bit)
    manifest = build_reference_cache(
        model,
        data,
        args.out,
        settings,
        tokenizer=tokenizer,
        batch_size=args.batch_size,
        max_shard_bytes=int(args.shard_mib * 2**20),
        chunk_size=args.chunk_size,
        full_weight_hash=not args.sample_weight_hash,
        overwrite=args.overwrite,
    )
    summary = {
        "path": str(args.out),
        "n_examples": manifest["n_examples"],
        "n_rows": manifest["n_rows"],
        "shards": len(manifest["shards"]),
        "seconds": manifest["build_seconds"],
    }
    print(json.dumps(summary))
    return 0


def _run(args: argparse.Namespace) -> int:
    from unlearn_kernels.train.config import default_config_yaml, load_config
    from unlearn_kernels.train.loop import run

    if args.print_config is not None:
        print(default_config_yaml(args.print_config), end="")
        return 0
    if args.config is None and not args.overrides:
        raise ValueError("--config FILE.yaml is needed (or --print-config METHOD to write one)")
    config = load_config(args.config, args.overrides)
    summary = run(config, resume=args.resume, progress=not args.no_progress)
    report = {
        "output_dir": str(summary.output_dir),
        "adapter": str(summary.adapter_dir),
        "steps": summary.steps,
        "seconds": round(summary.seconds, 3),
        "peak_bytes": summary.peak_bytes,
        "last": summary.metrics[-1] if summary.metrics else None,
    }
    print(json.dumps(report))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``unlearn-kernels`` and its subcommands."""
    parser = argparse.ArgumentParser(prog="unlearn-kernels", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    cache = commands.add_parser(
        "cache",
        help="build a reference cache",
        description="Run the frozen reference once over a data set and write a reference cache.",
    )
    cache.add_argument("--model", required=True, help="local transformers model directory")
    cache.add_argument("--data", required=True, help=".jsonl (prompt/response) or .safetensors")
    cache.add_argument("--out", required=True, type=Path, help="cache directory to write")
    cache.add_argument("--tokenizer", help="tokenizer.json or a tokenizer directory (for .jsonl)")
    cache.add_argument("--bos-id", type=int, help="token id put before each prompt")
    cache.add_argument("--eos-id", type=int, help="token id put after each response")
    cache.add_argument("--max-length", type=int, help="cut sequences to this many tokens")
    cache.add_argument("--topk", type=int, default=32, help="top-k log-probs per token (0: none)")
    cache.add_argument("--temperature", type=float, default=1.0, help="temperature of the top-k")
    cache.add_argument("--no-hidden", action="store_true", help="do not store hidden states")
    cache.add_argument(
        "--no-label-logprob", action="store_true", help="do not store label log-probs"
    )
    cache.add_argument("--hidden-dtype", choices=sorted(_MODEL_DTYPES), default="float32")
    cache.add_argument("--model-dtype", choices=sorted(_MODEL_DTYPES), default="float32")
    cache.add_argument("--load-in-4bit", action="store_true", help="bitsandbytes nf4 reference")
    cache.add_argument("--batch-size", type=int, default=8, help="examples per forward pass")
    cache.add_argument("--shard-mib", type=float, default=256.0, help="max tensor MiB per shard")
    cache.add_argument("--chunk-size", type=int, help="rows of reference logits at once")
    cache.add_argument(
        "--sample-weight-hash", action="store_true", help="fingerprint a sample of each weight"
    )
    cache.add_argument("--overwrite", action="store_true", help="replace an existing cache")
    cache.set_defaults(func=_cache)

    from unlearn_kernels.methods import METHODS

    run = commands.add_parser(
        "run",
        help="unlearn: train an adapter as a run config says",
        description="Train an adapter that forgets the forget set (a YAML run config).",
    )
    run.add_argument("--config", help="YAML run config (see --print-config)")
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key, e.g. --set train.lr=2e-4 (repeatable)",
    )
    run.add_argument(
        "--resume", action="store_true", help="continue from the last checkpoint in output_dir"
    )
    run.add_argument(
        "--print-config",
        metavar="METHOD",
        choices=sorted(METHODS),
        help=f"print a commented default config for METHOD ({', '.join(sorted(METHODS))})",
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.set_defaults(func=_run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``unlearn-kernels`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as err:
        print(f"unlearn-kernels {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
