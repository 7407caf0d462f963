"""The ``unlearn-kernels`` command (also ``python -m unlearn_kernels``).

``unlearn-kernels run --config FILE.yaml [--set key=value ...] [--resume]`` unlearns: it trains
an adapter with one of :mod:`unlearn_kernels.methods` as the run config says (see
:mod:`unlearn_kernels.train.config` and :mod:`unlearn_kernels.train.loop`);
``unlearn-kernels run --print-config METHOD`` prints a complete, commented default config.

``unlearn-kernels cache --model DIR --data FILE --out DIR [options]`` runs the frozen
reference model once over a data set and writes a reference cache (see
:mod:`unlearn_kernels.train.reference_cache`). ``--data`` is a ``.jsonl`` file of
``{"prompt": ..., "response": ...}`` lines (tokenised with ``--tokenizer``, by default the
model directory's tokenizer, with its own BOS/EOS) or a pre-tokenised ``.safetensors`` file
(see :mod:`unlearn_kernels.data.formats`).

``unlearn-kernels demo [--out DIR] [--cache-dir DIR] [--quick] [--methods ...]`` runs the
demo (:mod:`unlearn_kernels.demo.run`): a fictitious-author world, its base models, every
method's unlearning scored with TOFU's and MUSE's metrics, and one table.

``unlearn-kernels eval --model DIR [--adapter DIR] --data DIR [options]`` scores a local causal
LM (optionally with a PEFT adapter) on TOFU-format data with TOFU's and MUSE's metrics (see
:mod:`unlearn_kernels.eval`), prints them as a table and writes the report as JSON (``--out``);
``--retain-report`` (a report of the retain-only model) adds forget quality and privacy leakage.

Models and tokenizers are read from local paths only. Every flag is checked before anything is
loaded or written.

Every subcommand takes ``-v``/``-q`` (more or less logging on stderr, through :mod:`logging`)
and ``--no-progress``; a bad flag exits with status 2 naming it, a missing optional dependency
with status 1 and one line naming the extra to install. A new subcommand is a function
``_add_<name>(commands)`` that calls :func:`add_command` and is listed in ``_SUBCOMMANDS``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from unlearn_kernels import __version__
from unlearn_kernels._deps import MissingDependencyError, require

log = logging.getLogger("unlearn_kernels")

_MODEL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: Placement strategies of accelerate's ``device_map`` (a device name is accepted too).
_DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


class _TokenizerDefault:
    """Default of --bos-id / --eos-id: the tokenizer's own (shown so in ``--help``)."""

    def __str__(self) -> str:
        return "the tokenizer's"


_TOKENIZER_DEFAULT = _TokenizerDefault()


# ---- flag types: argparse names the flag in its error ------------------------------------


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be positive and finite, got {text}")
    return value


def _fraction(text: str) -> float:
    value = _positive_float(text)
    if value > 1.0:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1], got {text}")
    return value


def _forget_split(text: str) -> str:
    from unlearn_kernels.eval.data import forget_percent

    try:
        forget_percent(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected forgetNN with NN in 01..99 (e.g. forget10), got {text!r}"
        ) from None
    return text


def _token_id(text: str) -> int | None:
    if text.lower() == "none":
        return None
    return _int_at_least(0)(text)


def _device(text: str) -> torch.device:
    try:
        return torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r}") from None


# ---- checks that need several flags or the file system -----------------------------------


def _model_size(model_dir: Path, key: str) -> int | None:
    """``key`` (``vocab_size``, ``hidden_size``) from the model's ``config.json`` (no weights
    read), if it states one."""
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"--model {str(model_dir)!r}: config.json unreadable ({err})") from err
    value = config.get(key, (config.get("text_config") or {}).get(key))
    return value if isinstance(value, int) else None


def _shard_bytes(args: argparse.Namespace) -> int:
    """``--shard-mib`` in bytes."""
    return round(args.shard_mib * 2**20)


def _has_tokenizer(directory: Path) -> bool:
    return any((directory / name).is_file() for name in _TOKENIZER_FILES)


def _check_args(args: argparse.Namespace) -> None:
    """Everything that can be checked without loading the model or the tokenizer."""
    require("transformers", "safetensors", "tqdm", "pydantic", purpose="unlearn-kernels cache")
    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"--model {args.model!r} is not a local model directory (no config.json)")
    vocab = _model_size(model_dir, "vocab_size")
    if vocab is not None and args.topk > vocab:
        raise ValueError(f"--topk {args.topk} exceeds the model's vocabulary size {vocab}")
    data = Path(args.data)
    if not data.is_file():
        raise ValueError(f"--data {args.data!r} is not a file")
    if data.suffix not in (".jsonl", ".safetensors"):
        raise ValueError(f"--data must end in .jsonl or .safetensors, got {data.name!r}")
    if args.tokenizer is not None and not Path(args.tokenizer).exists():
        raise ValueError(f"--tokenizer {args.tokenizer!r} does not exist")
    if data.suffix == ".jsonl" and args.tokenizer is None and not _has_tokenizer(model_dir):
        raise ValueError(
            f"--data {data.name} needs a tokenizer: --model {args.model!r} holds none "
            f"({', '.join(_TOKENIZER_FILES)}); pass --tokenizer"
        )
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} exists and is not a directory")
    if (out / "manifest.json").exists() and not args.overwrite:
        raise ValueError(
            f"--out {str(out)!r} already holds a reference cache: pass --overwrite to replace it"
        )
    if _shard_bytes(args) < 1:
        raise ValueError(f"--shard-mib {args.shard_mib} is below one byte")
    _check_model_flags(args)


def _check_model_flags(args: argparse.Namespace) -> None:
    """The placement and quantisation flags of :func:`_add_model_flags`."""
    if args.device_map is not None:
        if args.device is not None:
            raise ValueError("pass --device or --device-map, not both")
        require("accelerate", purpose="--device-map")
        if args.device_map not in _DEVICE_MAP_STRATEGIES:
            _device_available("--device-map", _device(args.device_map))
    if args.device is not None:
        _device_available("--device", args.device)
    if args.load_in_4bit:
        require("bitsandbytes", purpose="--load-in-4bit")


def _device_available(flag: str, device: torch.device) -> None:
    backend = getattr(torch, device.type, None)
    if device.type != "cpu" and not (backend is not None and backend.is_available()):
        raise ValueError(f"{flag} {device}: that device is not available here")


# ---- loading -----------------------------------------------------------------------------


def _load_model(args: argparse.Namespace) -> torch.nn.Module:
    """The local transformers causal LM, optionally quantised to bitsandbytes nf4, placed on
    ``--device`` or by ``--device-map`` (default: CPU)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = _MODEL_DTYPES[args.model_dtype]
    kwargs: dict[str, Any] = {"dtype": dtype, "local_files_only": True}
    if args.load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
        )
    if args.device_map is not None:
        kwargs["device_map"] = args.device_map
    elif args.device is not None and args.device.type != "cpu":
        kwargs["device_map"] = {"": str(args.device)}
    try:
        return AutoModelForCausalLM.from_pretrained(args.model, **kwargs)
    except OSError as err:  # missing or unreadable weight files
        raise ValueError(f"--model {args.model!r}: {err}") from err


def _special_ids(tokenizer: Any, model_dir: Path) -> tuple[int | None, int | None]:
    """The tokenizer's own BOS/EOS ids; a bare ``tokenizers.Tokenizer`` (a ``tokenizer.json``
    file) has none, so the model config's are used."""
    if hasattr(tokenizer, "bos_token_id") or hasattr(tokenizer, "eos_token_id"):
        return getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    ids = [config.get(key) for key in ("bos_token_id", "eos_token_id")]
    return tuple(i if isinstance(i, int) else None for i in ids)


def _cache(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    _check_args(args)
    from unlearn_kernels.data.formats import load_pairs, load_tokenizer
    from unlearn_kernels.train.reference_cache import (
        CacheSettings,
        build_reference_cache,
        example_record_bytes,
    )

    settings = CacheSettings(
        topk=args.topk,
        temperature=args.temperature,
        store_hidden=not args.no_hidden,
        store_label_logprob=not args.no_label_logprob,
        hidden_dtype=args.hidden_dtype,
    )
    model_dir = Path(args.model)
    tokenizer_path = args.tokenizer or (model_dir if _has_tokenizer(model_dir) else None)
    tokenizer = None if tokenizer_path is None else load_tokenizer(tokenizer_path)
    bos, eos = (None, None) if tokenizer is None else _special_ids(tokenizer, model_dir)
    bos = bos if args.bos_id is _TOKENIZER_DEFAULT else args.bos_id
    eos = eos if args.eos_id is _TOKENIZER_DEFAULT else args.eos_id
    try:
        data = load_pairs(
            args.data, tokenizer, bos_token_id=bos, eos_token_id=eos, max_length=args.max_length
        )
    except ValueError as err:
        raise ValueError(f"--data {args.data}: {err}") from err
    log.info("%d examples from %s (BOS %s, EOS %s)", len(data), args.data, bos, eos)
    hidden_size = _model_size(model_dir, "hidden_size")
    if hidden_size is not None:
        rows = int((data.labels() != -100).sum(1).max())
        largest = example_record_bytes(rows, hidden_size, settings)
        if largest > _shard_bytes(args):
            raise ValueError(
                f"--shard-mib {args.shard_mib} is below the largest example's record "
                f"({largest} bytes = {largest / 2**20:.3g} MiB): raise it"
            )
    log.info("loading the reference model %s", args.model)
    model = _load_model(args)
    manifest = build_reference_cache(
        model,
        data,
        args.out,
        settings,
        tokenizer=tokenizer,
        batch_size=args.batch_size,
        max_shard_bytes=_shard_bytes(args),
        chunk_size=args.chunk_size,
        full_weight_hash=not args.sample_weight_hash,
        overwrite=args.overwrite,
        progress=show_progress(args),
    )
    seconds = round(time.perf_counter() - started, 3)
    log.info(
        "wrote %s: %d rows in %d shards (%.1f s, %.1f s building)",
        args.out,
        manifest["n_rows"],
        len(manifest["shards"]),
        seconds,
        manifest["build_seconds"],
    )
    summary = {
        "path": str(args.out),
        "n_examples": manifest["n_examples"],
        "n_rows": manifest["n_rows"],
        "shards": len(manifest["shards"]),
        "bos_token_id": bos,
        "eos_token_id": eos,
        "build_seconds": manifest["build_seconds"],
        "seconds": seconds,
    }
    print(json.dumps(summary))
    return 0


def _check_eval_args(args: argparse.Namespace) -> tuple[Any, Any]:
    """Every ``eval`` flag, without loading the model: returns the data and the retain-only
    model's report (or ``None``)."""
    require("transformers", "scipy", "rouge_score", purpose="unlearn-kernels eval")
    from unlearn_kernels.eval import EvalReport, read_tofu

    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"--model {args.model!r} is not a local model directory (no config.json)")
    if args.tokenizer is not None and not Path(args.tokenizer).exists():
        raise ValueError(f"--tokenizer {args.tokenizer!r} does not exist")
    if args.tokenizer is None and not _has_tokenizer(model_dir):
        raise ValueError(
            f"--model {args.model!r} holds no tokenizer ({', '.join(_TOKENIZER_FILES)}); "
            "pass --tokenizer"
        )
    if args.adapter is not None:
        if not (Path(args.adapter) / "adapter_config.json").is_file():
            raise ValueError(f"--adapter {args.adapter!r} is not a PEFT adapter directory")
        require("peft", purpose="--adapter")
    if args.out is not None:
        if args.out.is_dir():
            raise ValueError(f"--out {str(args.out)!r} is a directory; name the JSON file")
        if not args.out.parent.is_dir():
            raise ValueError(f"--out {str(args.out)!r}: its directory does not exist")
    _check_model_flags(args)
    try:
        data = read_tofu(args.data, args.forget_split)
    except ValueError as err:
        raise ValueError(f"--data {args.data}: {err}") from err
    reference = None
    if args.retain_report is not None:
        try:
            reference = EvalReport.from_json(Path(args.retain_report).read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ValueError(f"--retain-report {args.retain_report}: {err}") from err
        split = reference.settings.get("forget_split")
        if split != args.forget_split:
            raise ValueError(
                f"--retain-report {args.retain_report} was computed on {split!r}, "
                f"not --forget-split {args.forget_split}"
            )
    return data, reference


#: The first rows of ``eval``'s table (the rest follow in computation order).
_HEADLINE = ("forget_quality", "model_utility", "forget_prob", "retain_prob", "privleak")


def _print_table(metrics: dict[str, float]) -> None:
    names = [n for n in _HEADLINE if n in metrics] + [n for n in metrics if n not in _HEADLINE]
    width = max(len(name) for name in names)
    print(f"{'metric':<{width}}  value")
    for name in names:
        print(f"{name:<{width}}  {metrics[name]:.4g}")


def _eval(args: argparse.Namespace) -> int:
    data, reference = _check_eval_args(args)
    from unlearn_kernels._io import write_text_atomically
    from unlearn_kernels.data.formats import load_tokenizer
    from unlearn_kernels.eval import evaluate

    tokenizer = load_tokenizer(args.tokenizer or args.model)
    model = _load_model(args)
    if args.adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter)
    report = evaluate(
        model,
        tokenizer,
        data,
        retain_reference=reference,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        progress=show_progress(args),
        add_bos=not args.no_bos,
        add_eos=not args.no_eos,
        chat_template=args.chat_template,
        min_k=args.min_k,
    )
    _print_table(report.metrics)
    if args.out is not None:
        write_text_atomically(args.out, report.to_json())
    return 0


def _run(args: argparse.Namespace) -> int:
    require("pydantic", "yaml", purpose="unlearn-kernels run")
    from unlearn_kernels.train.config import default_config_yaml, load_config

    if args.print_config is not None:
        from unlearn_kernels.methods import METHODS

        if args.print_config not in METHODS:
            raise ValueError(
                f"--print-config must be one of {', '.join(sorted(METHODS))}, "
                f"got {args.print_config!r}"
            )
        print(default_config_yaml(args.print_config), end="")
        return 0
    if args.config is None and not args.overrides:
        raise ValueError("--config FILE.yaml is needed (or --print-config METHOD to write one)")
    config = load_config(args.config, args.overrides)
    require("transformers", "safetensors", "tqdm", purpose="unlearn-kernels run")
    from unlearn_kernels.train.loop import run

    summary = run(config, resume=args.resume, progress=show_progress(args))
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


# ---- the parser ----------------------------------------------------------------------------


class HelpFormatter(argparse.HelpFormatter):
    """Help that shows each option's default (unless it has none or the text states it)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        shown = action.default not in (None, False, [], argparse.SUPPRESS)
        if shown and action.option_strings and "default" not in text:
            text += " (default: %(default)s)"
        return text


def _common_options() -> argparse.ArgumentParser:
    """Options every subcommand takes (after its name): logging and progress bars."""
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("output")
    group.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=argparse.SUPPRESS,
        help="more log messages on stderr (-vv: debug)",
    )
    group.add_argument(
        "-q",
        "--quiet",
        action="count",
        default=argparse.SUPPRESS,
        help="warnings and errors only, no progress bars (-qq: errors only)",
    )
    group.add_argument(
        "--no-progress", action="store_true", default=argparse.SUPPRESS, help="no progress bars"
    )
    return common


def add_command(
    commands: argparse._SubParsersAction, name: str, *, help: str, description: str
) -> argparse.ArgumentParser:
    """A subcommand parser with the shared options and help formatter."""
    return commands.add_parser(
        name,
        help=help,
        description=description,
        parents=[_common_options()],
        formatter_class=HelpFormatter,
    )


def log_level(args: argparse.Namespace) -> int:
    """``INFO`` by default, ``DEBUG`` with ``-v``, ``WARNING`` with ``-q``, ``ERROR`` with
    ``-qq``."""
    steps = getattr(args, "verbose", 0) - getattr(args, "quiet", 0)
    return min(max(logging.INFO - 10 * steps, logging.DEBUG), logging.ERROR)


def show_progress(args: argparse.Namespace) -> bool:
    """Progress bars on stderr: on a terminal, unless ``--no-progress`` or ``-q``."""
    quiet = getattr(args, "no_progress", False) or log_level(args) > logging.INFO
    return not quiet and sys.stderr.isatty()


def _add_model_flags(parser: argparse.ArgumentParser, what: str) -> None:
    """The flags :func:`_load_model` reads: dtype, nf4, device or device map."""
    parser.add_argument(
        "--model-dtype",
        choices=sorted(_MODEL_DTYPES),
        default="float32",
        help=f"dtype the {what} is loaded in",
    )
    parser.add_argument(
        "--load-in-4bit", action="store_true", help=f"load the {what} as bitsandbytes nf4"
    )
    parser.add_argument(
        "--device", type=_device, help=f"device of the {what}, e.g. cuda:0 (default: cpu)"
    )
    parser.add_argument(
        "--device-map",
        help=f"accelerate device map: {', '.join(_DEVICE_MAP_STRATEGIES)} or a device",
    )


class _StderrHandler(logging.StreamHandler):
    """Log records of ``unlearn_kernels.*`` to whatever ``sys.stderr`` is when they are
    emitted."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass  # always the current sys.stderr


def _add_cache(commands: argparse._SubParsersAction) -> None:
    cache = add_command(
        commands,
        "cache",
        help="build a reference cache",
        description=(
            "Run the frozen reference model once over a data set and write a reference cache: "
            "per response token its top-k log-probs, tail log-mass, label log-prob and final "
            "hidden states, for the KL and NPO terms of unlearning. Every flag is checked "
            "before the model is loaded. See docs/cache.md."
        ),
    )
    cache.add_argument("--model", required=True, help="local transformers model directory")
    cache.add_argument(
        "--data",
        required=True,
        help=".jsonl of prompt/response lines, or a pre-tokenised .safetensors file",
    )
    cache.add_argument("--out", required=True, type=Path, help="cache directory to write")
    cache.add_argument(
        "--tokenizer",
        help="tokenizer.json or a tokenizer directory (default: the --model directory's)",
    )
    cache.add_argument(
        "--bos-id",
        type=_token_id,
        default=_TOKENIZER_DEFAULT,
        help="token id put before each prompt, or 'none'",
    )
    cache.add_argument(
        "--eos-id",
        type=_token_id,
        default=_TOKENIZER_DEFAULT,
        help="token id put after each response, or 'none'",
    )
    cache.add_argument(
        "--max-length", type=_int_at_least(2), help="cut sequences to this many tokens"
    )
    cache.add_argument(
        "--topk", type=_int_at_least(0), default=32, help="top-k log-probs per token (0: none)"
    )
    cache.add_argument(
        "--temperature", type=_positive_float, default=1.0, help="temperature of the top-k"
    )
    cache.add_argument("--no-hidden", action="store_true", help="do not store hidden states")
    cache.add_argument(
        "--no-label-logprob", action="store_true", help="do not store label log-probs"
    )
    cache.add_argument(
        "--hidden-dtype",
        choices=sorted(_MODEL_DTYPES),
        default="float32",
        help="dtype of the stored hidden states",
    )
    _add_model_flags(cache, "reference model")
    cache.add_argument(
        "--batch-size", type=_int_at_least(1), default=8, help="examples per forward pass"
    )
    cache.add_argument(
        "--shard-mib", type=_positive_float, default=256.0, help="max tensor MiB per shard"
    )
    cache.add_argument(
        "--chunk-size",
        type=_int_at_least(1),
        help="rows of reference logits formed at once (default: a 256 MiB budget)",
    )
    cache.add_argument(
        "--sample-weight-hash",
        action="store_true",
        help="fingerprint a sample of each weight instead of every byte (faster on big models)",
    )
    cache.add_argument("--overwrite", action="store_true", help="replace an existing cache")
    cache.set_defaults(func=_cache)


def _add_run(commands: argparse._SubParsersAction) -> None:
    run = add_command(
        commands,
        "run",
        help="unlearn: train an adapter as a run config says",
        description=(
            "Train an adapter (LoRA, QLoRA or full fine-tuning) that forgets the forget set, as "
            "a YAML run config says. See docs/methods.md."
        ),
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
        help="print a commented default config for METHOD, e.g. ngdiff (a wrong one lists them)",
    )
    run.set_defaults(func=_run)


def _add_eval(commands: argparse._SubParsersAction) -> None:
    evaluation = add_command(
        commands,
        "eval",
        help="score a model with TOFU's and MUSE's metrics",
        description=(
            "Evaluate a local causal LM on TOFU-format data (forget quality, model utility, "
            "answer probability, ROUGE, truth ratio, MUSE memorisation and privacy leakage). "
            "See docs/evaluation.md."
        ),
    )
    evaluation.add_argument("--model", required=True, help="local transformers model directory")
    evaluation.add_argument("--adapter", help="PEFT adapter directory to apply to --model")
    evaluation.add_argument("--data", required=True, help="directory of TOFU-format JSON files")
    evaluation.add_argument(
        "--forget-split",
        type=_forget_split,
        default="forget10",
        help="forget01, forget05, forget10, ...",
    )
    evaluation.add_argument(
        "--retain-report",
        help="JSON report of the retain-only model (adds forget_quality and privleak)",
    )
    evaluation.add_argument("--out", type=Path, help="write the report here as JSON")
    evaluation.add_argument(
        "--tokenizer", help="tokenizer.json or a tokenizer directory (default: --model's)"
    )
    evaluation.add_argument(
        "--batch-size", type=_int_at_least(1), default=16, help="sequences per forward pass"
    )
    evaluation.add_argument(
        "--max-new-tokens",
        type=_int_at_least(1),
        default=32,
        help="greedy tokens per answer / continuation",
    )
    evaluation.add_argument(
        "--min-k", type=_fraction, default=0.4, help="Min-K%% fraction of tokens"
    )
    evaluation.add_argument(
        "--no-bos", action="store_true", help="no BOS before prompts (training's data.add_bos)"
    )
    evaluation.add_argument(
        "--no-eos", action="store_true", help="no EOS after answers (training's data.add_eos)"
    )
    evaluation.add_argument(
        "--chat-template", action="store_true", help="render questions with the chat template"
    )
    _add_model_flags(evaluation, "model")
    evaluation.set_defaults(func=_eval)


def _demo(args: argparse.Namespace) -> int:
    require(
        "transformers",
        "tokenizers",
        "peft",
        "safetensors",
        "pydantic",
        "yaml",
        "tqdm",
        "scipy",
        "rouge_score",
        "matplotlib",
        purpose="unlearn-kernels demo",
    )
    from dataclasses import replace

    from unlearn_kernels.demo.run import DemoSettings, check_results, run_demo

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    overrides: dict[str, Any] = {}
    if args.forget_split is not None:
        overrides["forget_split"] = args.forget_split
    if args.methods is not None:
        overrides["methods"] = tuple(args.methods)
    settings = DemoSettings.quick(**overrides) if args.quick else DemoSettings(**overrides)
    if args.authors is not None:
        holdout = max(1, round(0.1 * args.authors))
        settings = replace(
            settings, world=replace(settings.world, n_authors=args.authors, n_holdout=holdout)
        )
    if args.base_epochs is not None:
        settings = replace(settings, base=replace(settings.base, epochs=args.base_epochs))
    if args.steps is not None:
        settings = replace(
            settings,
            method_settings={
                name: replace(m, steps=args.steps) for name, m in settings.method_settings.items()
            },
        )
    results = run_demo(
        settings,
        args.out,
        args.cache_dir,
        progress=show_progress(args),
        command=shlex.join(["unlearn-kernels", *args.argv]),
    )
    missed = check_results(results)
    if missed:
        print("NGDiff misses: " + "; ".join(missed))
    print(f"Results in {args.out}/ (results.csv, results.json, results.md, two PNG plots).")
    return 0


def _add_demo(commands: argparse._SubParsersAction) -> None:
    from unlearn_kernels.demo import METHOD_NAMES
    from unlearn_kernels.demo.world import FORGET_SPLITS

    demo = add_command(
        commands,
        "demo",
        help="the demo: a fictitious world, its models, unlearning scored (CPU, minutes)",
        description="Generate a fictitious-author world, train its target and retain-only "
        "models (cached), unlearn with NGDiff and the baselines, and print the TOFU/MUSE table.",
    )
    demo.add_argument("--out", type=Path, default=Path("demo-out"), help="results directory")
    demo.add_argument(
        "--cache-dir",
        type=Path,
        help="world and model cache (default: $XDG_CACHE_HOME/unlearn-kernels)",
    )
    demo.add_argument("--quick", action="store_true", help="NGDiff alone")
    demo.add_argument("--methods", nargs="+", choices=METHOD_NAMES, help="methods to run")
    demo.add_argument(
        "--forget-split", choices=sorted(FORGET_SPLITS), help="forget split (default: forget01)"
    )
    demo.add_argument(
        "--authors", type=_int_at_least(10), help="trained authors (size knob; default: 200)"
    )
    demo.add_argument("--base-epochs", type=_int_at_least(1), help="base-model epochs (size knob)")
    demo.add_argument("--steps", type=_int_at_least(1), help="unlearning steps of every method")
    demo.add_argument(
        "--threads", type=_int_at_least(1), help="torch CPU threads (default: torch's choice)"
    )
    demo.set_defaults(func=_demo)


#: Subcommands in the order ``--help`` lists them.
_SUBCOMMANDS = (_add_run, _add_cache, _add_eval, _add_demo)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``unlearn-kernels`` and its subcommands."""
    parser = argparse.ArgumentParser(
        prog="unlearn-kernels",
        description=(
            "Fused loss kernels for LLM unlearning: train an unlearning adapter (run), build "
            "the reference cache its KL and NPO terms read (cache), score a model with "
            "TOFU's and MUSE's metrics (eval), and see it all on a fictitious world (demo)."
        ),
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in _SUBCOMMANDS:
        add(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``unlearn-kernels`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    level = log.level
    log.addHandler(handler)
    log.setLevel(log_level(args))
    log.debug("arguments: %s", {k: v for k, v in vars(args).items() if k != "func"})
    try:
        return args.func(args)
    except MissingDependencyError as err:
        print(f"unlearn-kernels {args.command}: error: {err}", file=sys.stderr)
        return 1
    except ValueError as err:
        print(f"unlearn-kernels {args.command}: error: {err}", file=sys.stderr)
        return 2
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


if __name__ == "__main__":
    sys.exit(main())
