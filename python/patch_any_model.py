"""Patch a Hugging Face model so that its own ``labels=`` loss is the fused one, and train it
with an ordinary loop (or any trainer that calls ``model(..., labels=...)``).

    python python/patch_any_model.py --model DIR --forget forget.jsonl
    python python/patch_any_model.py --tiny     # CPU, seconds: every supported family

``unlearn_kernels.patch(model)`` changes this model's forward only (undone on leaving the
``with`` block): ``model(input_ids, attention_mask, labels=..., token_weight=...)`` returns the
fused loss with ``logits=None``. ``token_weight`` has the shape of ``labels`` and is shifted with
them; here ``−1`` on every label makes the loss gradient ascent on the forget responses.
Supported: Llama, Mistral, Qwen2/Qwen3, Phi-3, Gemma-2/3 (with their logit softcap), plain,
PEFT or bitsandbytes-quantised; another architecture is a ``ValueError`` naming it.
"""

from __future__ import annotations

import argparse
import json

import torch

import unlearn_kernels as uk
from unlearn_kernels.patching import FAMILIES

#: A tiny config per family for ``--tiny`` (random weights, no download).
TINY = {"vocab_size": 97, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "pad_token_id": 0,
        "bos_token_id": 1, "eos_token_id": 2}  # fmt: skip


def ascend(model, input_ids, attention_mask, labels, steps: int, lr: float) -> list[dict]:
    """Gradient ascent on ``labels`` through the patched forward (its loss is ``−NLL``), then the
    model's own unpatched ``labels=`` loss (``NLL``, from materialised logits) after it."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    logs = []
    for step in range(steps):
        with uk.patch(model):
            out = model(input_ids, attention_mask, labels=labels,
                        token_weight=-torch.ones(labels.shape))  # fmt: skip
        assert out.logits is None
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        logs.append({"step": step + 1, "loss": float(out.loss)})
    with torch.no_grad():  # unpatched again: the model's own loss (it materialises the logits)
        logs[-1]["own_nll_after"] = float(model(input_ids, attention_mask, labels=labels).loss)
    return logs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model")
    parser.add_argument("--forget")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--tiny", action="store_true", help="every supported family, tiny")
    args = parser.parse_args(argv)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if args.tiny:
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(3, 97, (4, 16), generator=generator)
        mask = torch.ones_like(ids)
        labels = ids.masked_fill(torch.arange(16) < 6, -100)  # the first 6 tokens: prompt
        for model_type, family in FAMILIES.items():
            torch.manual_seed(0)
            config = AutoConfig.for_model(model_type, **TINY)
            model = AutoModelForCausalLM.from_config(config).train()
            logs = ascend(model, ids, mask, labels, steps=3, lr=1e-2)
            nll = {"nll_before": -logs[0]["loss"], "nll_after": logs[-1]["own_nll_after"]}
            print(json.dumps({"family": family.name, **nll}))
        return
    if args.model is None or args.forget is None:
        parser.error("--model and --forget are needed (or --tiny)")
    from unlearn_kernels.data.unlearn import read_split

    tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True).train()
    forget = read_split(args.forget, tokenizer, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, max_length=512)  # fmt: skip
    unshifted = torch.full_like(forget.labels(), -100)  # the model shifts labels itself
    unshifted[:, 1:] = forget.labels()[:, :-1]
    for entry in ascend(model, forget.input_ids, forget.attention_mask, unshifted,
                        steps=args.steps, lr=1e-5):  # fmt: skip
        print(json.dumps(entry))


if __name__ == "__main__":
    main()
