"""QLoRA unlearning on one GPU: an nf4 base, LoRA on every linear layer, a cached reference,
paged 8-bit AdamW and gradient checkpointing.

    python python/qlora_single_gpu.py --model path/to/Meta-Llama-3-8B \\
        --forget forget.jsonl --retain retain.jsonl --out runs/qlora
    python python/qlora_single_gpu.py --model path/to/Meta-Llama-3-8B --estimate
    python python/qlora_single_gpu.py --tiny        # CPU, a random tiny Llama: the run and
                                                    # its peak resident memory vs the estimate

The method is ``kl``: gradient ascent on the forget responses plus the forward KL to the
original model on the retain responses. The original model is never kept beside the trained one:
its hidden states on the retain set are computed once, before any adapter exists, and cached on
disk (``output_dir/reference``); the fused KL rebuilds its logits chunk by chunk.

Memory, derived by :func:`unlearn_kernels.train.memory.qlora_memory` from the model config (its
docstring has the formula). For Llama-3-8B in bf16, micro-batches of 4 × 512 tokens per set,
LoRA r = 16:

    nf4 weights       3.93 GB
    dense weights     2.10 GB
    lora              0.17 GB
    lora grads        0.17 GB
    optimizer         0.09 GB
    checkpoints       0.54 GB
    one layer         0.68 GB
    fused loss        0.68 GB
    total             7.67 GB

(the total counts the larger of "one layer" and "fused loss": they are never alive together),
plus the CUDA context and the allocator's cache: a 12 GB GPU is enough. Logits materialised the
usual way would add 2048 × 128256 values, 0.53 GB in bf16, as much for their gradient and for
the KL's reference logits, and the float32 copies ``labels=`` losses make of them.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

#: Meta-Llama-3-8B's config.json (the keys the estimate reads).
LLAMA_3_8B = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "tie_word_embeddings": False,
}
#: The setting of the statement above.
STATEMENT = {"batch_size": 4, "max_length": 512, "lora_rank": 16, "compute_bytes": 2}
#: The tiny setting: float32 (bitsandbytes' CPU compute dtype), sequences that fill max_length.
TINY = {"batch_size": 8, "max_length": 64, "lora_rank": 8, "compute_bytes": 4}


def estimate(model_config: Any, *, batch_size: int, max_length: int, lora_rank: int,
             compute_bytes: int):  # fmt: skip
    """The memory of one step of this recipe (micro-batches padded to ``max_length``, every
    row a response row: the worst case)."""
    from unlearn_kernels.train.memory import qlora_memory

    return qlora_memory(
        model_config,
        tokens=batch_size * max_length,
        lora_rank=lora_rank,
        compute_bytes=compute_bytes,
        kl=True,
    )


def run_config(model: str, forget: str, retain: str, out: str, *, steps: int, setting: dict):
    """The run config of this recipe."""
    from unlearn_kernels.train.config import validate_config

    return validate_config(
        {
            "model": model,
            "data": {"forget": forget, "retain": retain, "max_length": setting["max_length"]},
            "method": {"name": "kl"},
            "adapter": {"kind": "qlora", "r": setting["lora_rank"], "alpha": 16},
            "train": {
                "steps": steps,
                "batch_size": setting["batch_size"],
                "lr": 1e-4,
                "optimizer": "paged_adamw8bit",
                "gradient_checkpointing": True,
                "dtype": "float32" if setting["compute_bytes"] == 4 else "bfloat16",
                "checkpoint_every": 0,
            },
            "reference": {"kind": "hidden"},
            "output_dir": out,
        }
    )


def tiny_setup(root: Path) -> dict[str, str]:
    """The ``--tiny`` world: long responses that fill ``max_length``, tied embeddings."""
    from tiny import tiny_world

    return tiny_world(
        root, vocab=64000, hidden=128, intermediate=344, layers=4,
        prompt_words=(2, 2), response_words=(64, 64), tied=True,
    )  # fmt: skip


def warm_up(root: Path) -> None:
    """One step of a much smaller run, so that what loads on first use (libraries, thread
    pools, kernels) is resident before the tiny run's memory is measured."""
    from tiny import tiny_world

    from unlearn_kernels.train.loop import run

    small = tiny_world(root / "world")
    config = run_config(small["model"], small["forget"], small["retain"], str(root / "run"),
                        steps=1, setting=TINY)  # fmt: skip
    run(config, progress=False)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="local Hugging Face model directory")
    parser.add_argument("--forget", help="forget set, JSONL of prompt/response")
    parser.add_argument("--retain", help="retain set, JSONL of prompt/response")
    parser.add_argument("--out", help="output directory (default: a temporary one)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--tiny", action="store_true", help="a random tiny Llama on CPU, and its "
                        "peak resident memory against the estimate")  # fmt: skip
    parser.add_argument("--estimate", action="store_true", help="print the memory estimate only")
    args = parser.parse_args(argv)

    from transformers import AutoConfig

    from unlearn_kernels._memory import rss_bytes
    from unlearn_kernels.train.loop import run

    root = Path(tempfile.mkdtemp(prefix="qlora-"))
    setting = TINY if args.tiny else STATEMENT
    if args.tiny:
        warm_up(root / "warm-up")
        world = tiny_setup(root / "world")
        args.model, args.forget, args.retain = world["model"], world["forget"], world["retain"]
        args.steps = 2
    if args.model is None:
        parser.error("--model is needed (or --tiny)")
    memory = estimate(AutoConfig.from_pretrained(args.model, local_files_only=True), **setting)
    print(memory.table())
    if args.estimate:
        return
    out = args.out or str(root / "run")
    config = run_config(
        args.model, args.forget, args.retain, out, steps=args.steps, setting=setting
    )
    before = rss_bytes()
    summary = run(config, progress=False)
    report = {"adapter": str(summary.adapter_dir), "last": summary.metrics[-1],
              "estimate": memory.total, "peak_bytes": summary.peak_bytes}  # fmt: skip
    if args.tiny:  # on CPU: the resident memory the run added (on GPU, read peak_bytes)
        report["measured"] = summary.peak_bytes - before
    print(json.dumps(report))


if __name__ == "__main__":
    main()
