"""The model side of a run: tokenizer, base model (plain or nf4), adapter, optimizer, schedule."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from unlearn_kernels._deps import require
from unlearn_kernels.data.formats import load_tokenizer
from unlearn_kernels.train.config import AdapterConfig, RunConfig, TrainConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def run_device(train: TrainConfig) -> torch.device:
    if train.device is not None:
        return torch.device(train.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def special_token_ids(tokenizer: Any, model_config: Any) -> tuple[int | None, int | None]:
    """``(bos, eos)`` ids: the tokenizer's own, else the model config's (``model_config``: a
    model directory or a loaded ``PretrainedConfig``)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    if bos is None or eos is None:
        config = model_config
        if isinstance(config, str | Path):
            require("transformers", purpose="reading the model config")
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(config, local_files_only=True)
        bos = config.bos_token_id if bos is None else bos
        eos = config.eos_token_id if eos is None else eos
    if isinstance(eos, list):  # some configs list several end tokens: the first ends responses
        eos = eos[0]
    return bos, eos


def load_run_tokenizer(config: RunConfig) -> Any:
    return load_tokenizer(config.tokenizer or config.model)


def load_base_model(config: RunConfig, device: torch.device) -> nn.Module:
    """The base causal LM in train mode (dropout on; bitsandbytes layers keep training=True)."""
    require("transformers", purpose="loading the model")
    if config.adapter.kind == "qlora":
        require("bitsandbytes", purpose="adapter.kind: qlora")
    from transformers import AutoModelForCausalLM

    dtype = DTYPES[config.train.dtype]
    kwargs: dict[str, Any] = {"dtype": dtype, "local_files_only": True}
    if config.adapter.kind == "qlora":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
        )
        kwargs["device_map"] = {"": device}
    model = AutoModelForCausalLM.from_pretrained(config.model, **kwargs)
    if config.adapter.kind != "qlora":
        model = model.to(device)
    if config.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def attach_adapter(model: nn.Module, adapter: AdapterConfig) -> nn.Module:
    """PEFT LoRA over ``adapter.target_modules`` (the base frozen), or every weight trainable."""
    if adapter.kind == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    require("peft", purpose=f"adapter.kind: {adapter.kind}")
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=adapter.r,
        lora_alpha=adapter.alpha,
        lora_dropout=adapter.dropout,
        target_modules=adapter.target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora).train()


def build_optimizer(params: list[torch.Tensor], train: TrainConfig) -> torch.optim.Optimizer:
    """AdamW from torch, or bitsandbytes' 8-bit (paged) AdamW."""
    options = {"lr": train.lr, "weight_decay": train.weight_decay}
    if train.optimizer == "adamw":
        return torch.optim.AdamW(params, **options)
    require("bitsandbytes", purpose=f"train.optimizer: {train.optimizer}")
    import bitsandbytes as bnb

    cls = bnb.optim.AdamW8bit if train.optimizer == "adamw8bit" else bnb.optim.PagedAdamW8bit
    return cls(params, **options)


class LRSchedule:
    """Learning-rate factor at step ``s``: linear warmup over ``warmup`` steps, then constant or
    a cosine decay to 0 at step ``total``."""

    def __init__(self, kind: str, warmup: int, total: int) -> None:
        self.kind, self.warmup, self.total = kind, warmup, total

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        if self.kind == "constant":
            return 1.0
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def build_scheduler(
    optimizer: torch.optim.Optimizer, train: TrainConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    schedule = LRSchedule(train.schedule, train.warmup_steps, train.steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
