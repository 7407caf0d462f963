"""UnlearningTrainer: step for step the same as ``unlearn-kernels run`` on the same config;
resume from a Trainer checkpoint; bf16 autocast; argument checks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from oracle import rel_err
from run_helpers import config_for, tiny_world
from safetensors.torch import load_file

from unlearn_kernels.train.loop import run
from unlearn_kernels.train.trainer import UnlearningTrainer

pytestmark = pytest.mark.hf


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    return tiny_world(tmp_path_factory.mktemp("world"))


def adapter(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "adapter_model.safetensors"))


def run_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def trainer_metrics(trainer: UnlearningTrainer) -> list[dict]:
    return [entry for entry in trainer.state.log_history if "loss" in entry]


CASES = {
    # GeN probing at steps 0, 2, 4; LoRA dropout (the Trainer's seeding of it must match)
    "ngdiff": {
        "method": {"gen_every": 2},
        "train": {"lr": 5e-2, "grad_accum": 2},
        "adapter": {"dropout": 0.1},
    },
    "graddiff": {"train": {"lr": 1e-2, "grad_accum": 2, "schedule": "cosine", "warmup_steps": 2}},
    "npo": {"train": {"lr": 1e-2}},  # reference log-likelihoods from a cache
    "yao": {"train": {"lr": 1e-2}},  # random mismatch and the KL to a cached reference
}


@pytest.mark.parametrize("method", sorted(CASES))
def test_trainer_takes_the_steps_of_unlearn_kernels_run(world, tmp_path, method):
    sections = {key: dict(value) for key, value in CASES[method].items()}
    sections["train"].update(steps=5, batch_size=3)
    config = config_for(world, method, tmp_path / "run", **sections)
    run(config, progress=False)
    trained = config.model_copy(update={"output_dir": str(tmp_path / "trainer")})
    trainer = UnlearningTrainer.from_config(trained, disable_tqdm=True)
    trainer.train()
    trainer.save_model()
    expected, got = run_metrics(tmp_path / "run"), trainer_metrics(trainer)
    assert [m["step"] for m in got] == [1, 2, 3, 4, 5]
    for a, b in zip(got, expected, strict=True):
        assert math.isclose(a["learning_rate"], b["lr"], rel_tol=1e-12), (a, b)
        for key, value in b.items():
            if key in ("step", "seconds", "lr"):
                continue
            assert math.isclose(a[key], value, rel_tol=1e-6, abs_tol=1e-7), (key, a, b)
    a, b = adapter(tmp_path / "trainer"), adapter(tmp_path / "run" / "adapter")
    assert a.keys() == b.keys()
    errors = {name: rel_err(a[name], b[name]) for name in a}
    assert max(errors.values()) < 1e-6, errors


def test_resume_from_a_trainer_checkpoint_is_bit_identical(world, tmp_path):
    sections = {key: dict(value) for key, value in CASES["ngdiff"].items()}
    sections["train"].update(steps=4, batch_size=3, checkpoint_every=2)
    config = config_for(world, "ngdiff", tmp_path / "whole", **sections)
    whole = UnlearningTrainer.from_config(config, disable_tqdm=True)
    whole.train()
    whole.save_model()
    checkpoint = tmp_path / "whole" / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").is_file()
    resumed_config = config.model_copy(update={"output_dir": str(tmp_path / "resumed")})
    resumed = UnlearningTrainer.from_config(resumed_config, disable_tqdm=True)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    resumed.save_model()
    a, b = adapter(tmp_path / "resumed"), adapter(tmp_path / "whole")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [m for m in trainer_metrics(resumed) if m["step"] > 2]
    assert [m["step"] for m in steps] == [3, 4]
    for m, w in zip(steps, trainer_metrics(whole)[2:], strict=True):
        assert m["forget_nll"] == w["forget_nll"] and m["learning_rate"] == w["learning_rate"]


def test_bf16_mixed_precision_runs_the_forwards_under_autocast(world, tmp_path):
    config = config_for(world, "ngdiff", tmp_path / "bf16", train={"steps": 2, "lr": 1e-2})
    trainer = UnlearningTrainer.from_config(config, bf16=True, disable_tqdm=True)
    seen = set()
    mlp = trainer.model.get_base_model().model.layers[0].mlp
    mlp.register_forward_hook(lambda module, args, out: seen.add(out.dtype))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    assert seen == {torch.bfloat16}
    after = dict(trainer.model.named_parameters())
    assert all(
        torch.isfinite(after[n]).all() and not torch.equal(after[n], p) for n, p in before.items()
    )
    logged = trainer_metrics(trainer)
    assert all(math.isfinite(m["forget_grad_norm"]) and m["forget_grad_norm"] > 0 for m in logged)


def test_bad_arguments_name_themselves(world, tmp_path):
    from transformers import TrainingArguments

    config = config_for(world, "ngdiff", tmp_path / "x")
    trainer = UnlearningTrainer.from_config(config)
    model, forget = trainer.model, trainer.data.forget
    common = {"output_dir": str(tmp_path / "y"), "report_to": "none", "use_cpu": True}
    with pytest.raises(ValueError, match="max_steps"):
        UnlearningTrainer(model, TrainingArguments(**common), method="ga", forget_dataset=forget)
    with pytest.raises(ValueError, match="lr_scheduler_type"):
        UnlearningTrainer(
            model, TrainingArguments(max_steps=2, **common), method="ngdiff",
            forget_dataset=forget, retain_dataset=forget,
        )  # fmt: skip
    with pytest.raises(ValueError, match="retain"):
        UnlearningTrainer(
            model, TrainingArguments(max_steps=2, **common), method="graddiff",
            forget_dataset=forget,
        )  # fmt: skip
    with pytest.raises(ValueError, match="method"):
        UnlearningTrainer(
            model, TrainingArguments(max_steps=2, **common), method={"beta": 1},
            forget_dataset=forget,
        )  # fmt: skip
