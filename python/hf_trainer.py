"""Unlearning with ``transformers.Trainer``: ``UnlearningTrainer`` takes a forget and a retain set
and any method of ``unlearn_kernels.methods`` by name.

    python python/hf_trainer.py --model DIR --forget forget.jsonl --retain retain.jsonl \\
        --method ngdiff --out runs/trainer
    accelerate launch python/hf_trainer.py ...     # or torchrun: data-parallel
    python python/hf_trainer.py --tiny             # CPU, seconds: a random tiny Llama

Everything else is the Trainer's: ``TrainingArguments`` (accumulation, bf16, gradient
checkpointing, ``save_steps``, ``resume_from_checkpoint``), ``save_model``, callbacks, logging
(the method's terms appear by name in ``trainer.state.log_history``). NGDiff's two backward
passes, its combine and GeN's learning rate run inside ``training_step``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

from unlearn_kernels.data.unlearn import read_split
from unlearn_kernels.train.trainer import UnlearningTrainer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model")
    parser.add_argument("--forget")
    parser.add_argument("--retain")
    parser.add_argument(
        "--method", default="ngdiff", help="ga, graddiff, kl, yao, ngdiff, npo, ..."
    )
    parser.add_argument("--out", help="output directory (default: a temporary one)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--tiny", action="store_true", help="a random tiny Llama on CPU")
    args = parser.parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="trainer-"))
    if args.tiny:
        from tiny import tiny_world

        world = tiny_world(out / "world")
        args.model, args.forget, args.retain = world["model"], world["forget"], world["retain"]
        args.steps = 4
    if args.model is None:
        parser.error("--model is needed (or --tiny)")

    tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    options = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "max_length": 512}  # fmt: skip
    trainer = UnlearningTrainer(
        model=model,
        args=TrainingArguments(
            output_dir=str(out / "run"),
            max_steps=args.steps,
            per_device_train_batch_size=4,
            gradient_accumulation_steps=2,
            learning_rate=1e-4,
            lr_scheduler_type="constant",  # NGDiff's GeN sets the learning rate itself
            logging_steps=1,
            save_steps=50,
            report_to="none",
            use_cpu=args.tiny,
        ),
        method=args.method,
        forget_dataset=read_split(args.forget, tokenizer, **options),
        retain_dataset=read_split(args.retain, tokenizer, **options),
        processing_class=tokenizer,
    )
    trainer.train()
    trainer.save_model()
    if trainer.is_world_process_zero():
        logged = [entry for entry in trainer.state.log_history if "loss" in entry]
        print(json.dumps({"adapter": trainer.args.output_dir, "last": logged[-1]}))


if __name__ == "__main__":
    main()
