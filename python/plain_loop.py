"""A hand-written PyTorch loop with the fused loss: gradient difference on a LoRA model.

    python python/plain_loop.py --model DIR --forget forget.jsonl --retain retain.jsonl
    python python/plain_loop.py --tiny        # CPU, seconds: a random tiny Llama

Each step runs the decoder on a forget batch and a retain batch, keeps the hidden states of the
response rows only, and hands both sets of rows to *one* fused cross-entropy call with signed
token weights: ``−1/|forget tokens|`` (ascent) and ``+1/|retain tokens|`` (descent). The loss
is ``NLL(retain) − NLL(forget)``; the ``[rows, vocab]`` logits are never built.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

import unlearn_kernels as uk
from unlearn_kernels.data.unlearn import read_split
from unlearn_kernels.hf import final_hidden_states, output_head


def response_rows(model, batch):
    """Final hidden states of the response rows ``[n, d]`` and their target tokens ``[n]``."""
    labels = batch.labels()  # row t predicts token t + 1; -100 off the responses
    hidden = final_hidden_states(model, batch.input_ids, batch.attention_mask)
    valid = labels != -100
    return hidden[valid], labels[valid]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model")
    parser.add_argument("--forget")
    parser.add_argument("--retain")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--tiny", action="store_true", help="a random tiny Llama on CPU")
    args = parser.parse_args(argv)
    if args.tiny:
        from tiny import tiny_world

        world = tiny_world(Path(tempfile.mkdtemp(prefix="plain-")))
        args.model, args.forget, args.retain = world["model"], world["forget"], world["retain"]
        args.steps, args.lr = 5, 1e-2
    if args.model is None:
        parser.error("--model is needed (or --tiny)")

    tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    options = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "max_length": 512}  # fmt: skip
    forget = read_split(args.forget, tokenizer, **options)
    retain = read_split(args.retain, tokenizer, **options)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    generator = torch.Generator().manual_seed(0)

    model.train()
    for step in range(args.steps):
        pick = {name: torch.randint(len(data), (args.batch_size,), generator=generator).tolist()
                for name, data in (("forget", forget), ("retain", retain))}  # fmt: skip
        f_hidden, f_labels = response_rows(model, forget.select(pick["forget"]))
        r_hidden, r_labels = response_rows(model, retain.select(pick["retain"]))
        weights = torch.cat([torch.full((len(f_labels),), -1.0 / len(f_labels)),
                             torch.full((len(r_labels),), 1.0 / len(r_labels))])  # fmt: skip
        head = output_head(model)
        loss = uk.fused_linear_cross_entropy(
            torch.cat([f_hidden, r_hidden]),
            head.weight,
            torch.cat([f_labels, r_labels]),
            token_weight=weights,
            bias=head.bias,
            softcap=head.softcap,  # Gemma-2/3's final logit softcap (None elsewhere)
            reduction="sum",
        )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        print(json.dumps({"step": step + 1, "loss": float(loss)}))


if __name__ == "__main__":
    main()
