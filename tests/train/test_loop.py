"""The unlearning loop end to end on a tiny local Llama: metrics, adapters, resume after
``kill -9``, the printed default configs, bad configs and data, failures, QLoRA."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hf_helpers import bnb_usable
from run_helpers import config_for, save_tiny_model, tiny_world
from safetensors.torch import load_file

from unlearn_kernels.cli import main as cli_main
from unlearn_kernels.methods import METHODS
from unlearn_kernels.train.config import config_yaml, default_config_yaml, load_config
from unlearn_kernels.train.loop import run

pytestmark = pytest.mark.hf
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    return tiny_world(tmp_path_factory.mktemp("world"))


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def adapter_tensors(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


# ---- runs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_runs_and_writes_its_outputs(world, tmp_path, method):
    out = tmp_path / "run"
    summary = run(config_for(world, method, out, train={"steps": 3}), progress=False)
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    terms = {"ga": ["forget_nll"], "ngdiff": ["forget_nll", "retain_nll", "cosine"]}
    # after its first probe GeN may move NGDiff's rate to s·η + (1 − s)·r^±1·η (s = 0.9, r = 2)
    low, high = (0.95e-4, 1.1e-4) if method == "ngdiff" else (1e-4, 1e-4)
    assert metrics[0]["lr"] == pytest.approx(1e-4)
    assert all(low * (1 - 1e-9) <= m["lr"] <= high * (1 + 1e-9) for m in metrics)
    for m in metrics:
        for name in terms.get(method, ["loss"]):
            assert isinstance(m[name], float) and m[name] == m[name], (name, m)
    assert summary.adapter_dir == out / "adapter"
    tensors = adapter_tensors(out)
    assert tensors and all(torch.isfinite(t).all() for t in tensors.values())
    assert yaml.safe_load((out / "config.yaml").read_text())["method"]["name"] == method
    assert summary.peak_bytes > 0 and summary.seconds > 0


def test_gradient_ascent_raises_the_forget_loss(world, tmp_path):
    config = config_for(world, "ga", tmp_path / "run", train={"steps": 6, "lr": 1e-2})
    metrics = run(config, progress=False).metrics
    assert metrics[-1]["forget_nll"] > metrics[0]["forget_nll"] + 0.1


def test_grad_accum_is_one_large_batch(world, tmp_path):
    """Two micro-batches of 2 give the step of one batch of 4 (global-count normalisation)."""
    common = {"steps": 2, "shuffle": False, "lr": 1e-2}
    a = run(config_for(world, "graddiff", tmp_path / "a", train={**common, "batch_size": 4}))
    b = run(
        config_for(
            world, "graddiff", tmp_path / "b", train={**common, "batch_size": 2, "grad_accum": 2}
        ),
        progress=False,
    )
    for x, y in zip(a.metrics, b.metrics, strict=True):
        for key in ("forget_nll", "retain_nll"):
            assert x[key] == pytest.approx(y[key], rel=1e-5)
    ta, tb = adapter_tensors(tmp_path / "a"), adapter_tensors(tmp_path / "b")
    for name in ta:
        # fp32 sums in another order, through two Adam steps (g/√v amplifies tiny differences;
        # atol 1e-5 is 0.1% of one step at lr 1e-2)
        torch.testing.assert_close(ta[name], tb[name], rtol=1e-3, atol=1e-5)


def test_eval_hook_sees_every_interval_without_touching_the_rng(world, tmp_path):
    seen = []

    def on_eval(step, model):
        seen.append((step, model.training))
        torch.rand(3)  # an evaluation that draws random numbers must not shift training
        return {"probe": float(step)}

    train = {"steps": 4, "eval_every": 2}
    adapter = {"dropout": 0.3}
    with_hook = run(
        config_for(world, "graddiff", tmp_path / "a", train=train, adapter=adapter),
        progress=False,
        on_eval=on_eval,
    )
    assert seen == [(0, False), (2, False), (4, False)]
    assert [m.get("eval/probe") for m in with_hook.metrics] == [0.0, None, 2.0, None, 4.0]
    run(config_for(world, "graddiff", tmp_path / "b", train=train, adapter=adapter))
    ta, tb = adapter_tensors(tmp_path / "a"), adapter_tensors(tmp_path / "b")
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


def naive_answer_probability(model, data, n: int) -> float:
    """``mean_i exp(−mean_t ℓ_t)`` over ``data``'s first ``n`` responses, from float64 logits."""
    probs = []
    with torch.no_grad():
        for i in range(n):
            ids = data.input_ids[i][data.attention_mask[i].bool()]
            logits = model(ids[None]).logits[0].double()
            logp = logits.log_softmax(-1)[:-1].gather(1, ids[1:, None])[:, 0]
            start = int(data.prompt_lengths[i])
            probs.append(math.exp(logp[start - 1 :].mean().item()))
    return sum(probs) / n


def test_built_in_probe_logs_answer_probabilities(world, tmp_path):
    """Without ``on_eval``, ``eval_every`` logs the forget/retain answer probability of the
    run's first ``eval_examples`` examples, equal to a float64 oracle; ascent lowers it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from unlearn_kernels.data.unlearn import read_split

    out = tmp_path / "run"
    train = {"steps": 4, "lr": 1e-2, "eval_every": 2, "eval_examples": 5}
    metrics = run(config_for(world, "graddiff", out, train=train), progress=False).metrics
    assert [sorted(k for k in m if k.startswith("eval/")) for m in metrics[::2]] == [
        ["eval/forget_prob", "eval/retain_prob"]
    ] * 3
    tokenizer = AutoTokenizer.from_pretrained(world["model"])
    options = {"bos_token_id": 1, "eos_token_id": 2, "max_length": 512}
    sets = {
        name: read_split(world["data"][name], tokenizer, **options) for name in ("forget", "retain")
    }
    base = AutoModelForCausalLM.from_pretrained(world["model"]).eval()
    tuned = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(world["model"]), out / "adapter"
    ).eval()
    for step, model in ((0, base), (-1, tuned)):
        for name, data in sets.items():
            expected = naive_answer_probability(model, data, 5)
            assert metrics[step][f"eval/{name}_prob"] == pytest.approx(expected, rel=1e-5)
    assert metrics[-1]["eval/forget_prob"] < 0.95 * metrics[0]["eval/forget_prob"]


# ---- resume after kill -9 ---------------------------------------------------------------

KILLER = """
import os, signal, sys
from unlearn_kernels.train.config import load_config
from unlearn_kernels.train.loop import run

def on_eval(step, model):
    if step == int(sys.argv[2]):
        os.kill(os.getpid(), signal.SIGKILL)
    return {}

run(load_config(sys.argv[1]), progress=False, on_eval=on_eval)
"""


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "unlearn_kernels.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )


@pytest.mark.parametrize(
    ("method", "sections", "kill_at"),
    [
        ("ngdiff", {"method": {"gen_every": 2}, "adapter": {"dropout": 0.2}}, 5),
        (
            "yao",
            {"train": {"schedule": "cosine", "warmup_steps": 2, "grad_accum": 2}},
            7,
        ),
    ],
)
def test_kill_9_and_resume_is_bit_identical(world, tmp_path, method, sections, kill_at):
    train = {"steps": 8, "checkpoint_every": 3, "eval_every": 1, **sections.pop("train", {})}
    killed = config_for(world, method, tmp_path / "killed", train=train, **sections)
    whole = killed.model_copy(update={"output_dir": str(tmp_path / "whole")})
    config_file = tmp_path / "killed.yaml"
    config_file.write_text(config_yaml(killed))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", KILLER, str(config_file), str(kill_at)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not (tmp_path / "killed" / "adapter").exists()
    resumed = _cli("run", "--config", str(config_file), "--resume", "--no-progress")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    (tmp_path / "whole.yaml").write_text(config_yaml(whole))
    uninterrupted = _cli("run", "--config", str(tmp_path / "whole.yaml"), "--no-progress")
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-2000:]
    a, b = adapter_tensors(tmp_path / "killed"), adapter_tensors(tmp_path / "whole")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name

    # the killer's hook logs nothing, the CLI's built-in probe eval/...: compare the rest
    def kept(out: Path) -> list[dict]:
        lines = read_metrics(out)
        return [{k: v for k, v in m.items() if k != "seconds" and "/" not in k} for m in lines]

    assert kept(tmp_path / "killed") == kept(tmp_path / "whole")
    assert [m["step"] for m in kept(tmp_path / "killed")] == list(range(9))


# ---- configs -----------------------------------------------------------------------------


@pytest.mark.parametrize("method", sorted(METHODS))
def test_printed_default_config_runs(world, tmp_path, method):
    assert cli_main(["run", "--print-config", method]) == 0
    text = default_config_yaml(method)
    tree = yaml.safe_load(text)
    assert tree["method"]["name"] == method and "#" in text
    config = tmp_path / "config.yaml"
    config.write_text(text)
    out = tmp_path / "run"
    code = cli_main(
        [
            "run",
            "--config",
            str(config),
            "--no-progress",
            "--set",
            f"model={world['model']}",
            "--set",
            f"data.forget={world['data']['forget']}",
            "--set",
            f"data.retain={world['data']['retain']}",
            "--set",
            f"output_dir={out}",
            "--set",
            "train.steps=2",
        ]
    )
    assert code == 0
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert load_config(out / "config.yaml").method == load_config(config).method


BAD_CONFIGS = [
    ({"train": {"lr": -1}}, "train.lr"),
    ({"train": {"steps": "many"}}, "train.steps"),
    ({"train": {"bogus": 1}}, "train.bogus"),
    ({"adapter": {"kind": "dora"}}, "adapter.kind"),
    ({"method": {"name": "ga", "beta": 0.1}}, "method.beta"),
    ({"method": {"name": "npo", "beta": 0}}, "method.beta"),
    ({"method": {"name": "unlearn-everything"}}, "method"),
    ({"method": {"name": "ngdiff"}, "train": {"schedule": "cosine"}}, "train.schedule"),
    ({"adapter": {"kind": "qlora", "merge": True}}, "adapter.merge"),
    ({"method": {"name": "graddiff"}, "data": {"retain": None}}, "data.retain"),
    ({"data": {"forget": "missing.jsonl"}}, "data.forget"),
    ({"model": "no/such/model"}, "model"),
]


@pytest.mark.parametrize(("change", "key"), BAD_CONFIGS)
def test_bad_config_names_the_key_and_writes_nothing(world, tmp_path, change, key):
    tree = {
        **world,
        "method": {"name": "graddiff"},
        "train": {"steps": 1},
        "output_dir": str(tmp_path / "run"),
    }
    for section, value in change.items():
        tree[section] = {**tree.get(section, {}), **value} if isinstance(value, dict) else value
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(tree))
    with pytest.raises(ValueError, match=rf"(^|[ :]){key}[:\s]"):
        run(load_config(config), progress=False)
    assert not (tmp_path / "run").exists()
    assert cli_main(["run", "--config", str(config)]) == 2


def test_set_override_errors_name_the_assignment(world, tmp_path):
    with pytest.raises(ValueError, match=r"key\.path=value"):
        load_config(None, ["train.lr"])
    with pytest.raises(ValueError, match=r"train\.lr"):
        load_config(None, [f"model={world['model']}", "train.lr=fast"])


BAD_DATA = [
    ('{"prompt": "w5 w6", "response": "w7"}\n{"prompt": "w8"\n', "forget.jsonl:2: not valid JSON"),
    ('{"prompt": "w5", "response": "w7"}\n\n{"prompt": "w8", "answer": "w9"}\n', "forget.jsonl:3"),
    ("\n\n", "holds no example"),
    ('{"prompt": "w5 w6", "response": "w7"}\n{"prompt": "w8", "response": ""}\n', "forget.jsonl:2"),
]


@pytest.mark.parametrize(("text", "message"), BAD_DATA)
def test_bad_data_names_file_and_line_and_writes_nothing(world, tmp_path, text, message):
    forget = tmp_path / "forget.jsonl"
    forget.write_text(text)
    config = config_for(
        {**world, "data": {**world["data"], "forget": str(forget)}}, "graddiff", tmp_path / "run"
    )
    with pytest.raises(ValueError, match=message):
        run(config, progress=False)
    assert not (tmp_path / "run").exists()


def test_existing_output_dir_is_not_overwritten(world, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "precious.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not empty"):
        run(config_for(world, "ga", tmp_path / "run"), progress=False)
    assert (tmp_path / "run" / "precious.txt").read_text() == "keep me"


def test_a_failed_run_keeps_its_last_checkpoint_and_resumes(world, tmp_path):
    out = tmp_path / "run"
    config = config_for(world, "graddiff", out, train={"steps": 6, "checkpoint_every": 2})

    def fail_at_5(step, model):
        if step == 5:
            raise RuntimeError("simulated failure")
        return {}

    cfg = config.model_copy(update={"train": config.train.model_copy(update={"eval_every": 1})})
    with pytest.raises(RuntimeError, match="simulated") as err:
        run(cfg, progress=False, on_eval=fail_at_5)
    assert "step 4" in "".join(err.value.__notes__)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    assert [m["step"] for m in read_metrics(out)] == [0, 1, 2, 3, 4]
    assert not (out / "adapter").exists()
    summary = run(cfg, resume=True, progress=False)
    assert [m["step"] for m in read_metrics(out)] == [0, 1, 2, 3, 4, 5, 6]
    assert summary.adapter_dir.is_dir()
    with pytest.raises(ValueError, match="finished run"):
        run(cfg, resume=True, progress=False)


def test_a_failure_before_any_checkpoint_leaves_nothing(world, tmp_path):
    def fail(step, model):
        raise RuntimeError("simulated failure")

    config = config_for(world, "ga", tmp_path / "run", train={"eval_every": 1})
    with pytest.raises(RuntimeError, match="simulated"):
        run(config, progress=False, on_eval=fail)
    assert not (tmp_path / "run").exists()


def test_resume_refuses_another_config(world, tmp_path):
    out = tmp_path / "run"
    run(config_for(world, "ga", out, train={"steps": 2}), progress=False)
    with pytest.raises(ValueError, match=r"train\.lr"):
        run(config_for(world, "ga", out, train={"steps": 2, "lr": 1e-3}), resume=True)
    with pytest.raises(ValueError, match="no run to resume"):
        run(config_for(world, "ga", tmp_path / "other"), resume=True)


# ---- QLoRA --------------------------------------------------------------------------------


def test_qlora_nf4_gets_lora_gradients_and_forgets(world, tmp_path):
    if (reason := bnb_usable()) is not None:
        pytest.skip(reason)
    model = save_tiny_model(tmp_path / "model", 3, hidden_size=64, intermediate_size=128)
    config = config_for(
        {**world, "model": str(model)},
        "ga",
        tmp_path / "run",
        adapter={"kind": "qlora"},
        train={"steps": 5, "lr": 1e-2},
    )
    metrics = run(config, progress=False).metrics  # raises if a LoRA gradient is None
    assert all(m["grad_norm"] > 0 and m["grad_norm"] < float("inf") for m in metrics)
    assert metrics[-1]["forget_nll"] > metrics[0]["forget_nll"]
    assert all(torch.isfinite(t).all() for t in adapter_tensors(tmp_path / "run").values())


def test_ngdiff_probes_run_without_dropout_and_leave_train_mode(world, tmp_path):
    from unlearn_kernels.train.loop import UnlearningRun

    out = tmp_path / "run"
    config = config_for(world, "ngdiff", out, adapter={"dropout": 0.5})
    state = UnlearningRun(config, out, False, None)
    state.build()
    with torch.no_grad():  # LoRA B starts at 0, which would hide dropout on the LoRA branch
        for name, p in state.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)
    batches, totals = state.data.step(0)
    probes = [state.steps._task_loss("forget", batches, totals) for _ in range(3)]
    assert probes[0] == probes[1] == probes[2]  # dropout 0.5 would make them differ
    assert state.model.training
    with torch.no_grad():
        noisy = [
            float(
                sum(
                    t.loss
                    for b in batches
                    for t in state.method.terms(state.model, "forget", b, totals)
                )
            )
            for _ in range(2)
        ]
    assert noisy[0] != noisy[1]  # in train mode the same loss is random: dropout is on
    state.model.eval()
    with torch.no_grad():
        clean = sum(
            float(t.loss)
            for b in batches
            for t in state.method.terms(state.model, "forget", b, totals)
        )
    assert clean == pytest.approx(probes[0], rel=1e-6)


def test_bf16_run_and_merged_adapter(world, tmp_path):
    out = tmp_path / "run"
    config = config_for(
        world, "graddiff", out, train={"dtype": "bfloat16", "steps": 2}, adapter={"merge": True}
    )
    metrics = run(config, progress=False).metrics
    assert all(m["forget_nll"] == m["forget_nll"] for m in metrics)
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out / "merged", local_files_only=True)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert merged.dtype == torch.bfloat16
