"""``unlearn-kernels eval`` on a saved tiny Llama, its tokenizer and a TOFU-format fixture in
JSON lines: the table, the JSON report, ``--adapter``, ``--retain-report``, and flag errors."""

from __future__ import annotations

import json

import pytest
import torch
from hf_helpers import lora
from run_helpers import save_tiny_model
from tofu_fixture import write_tofu

from unlearn_kernels import cli
from unlearn_kernels.cli import main
from unlearn_kernels.eval import EvalReport, evaluate, read_tofu

SMALL = ["--max-new-tokens", "2", "--batch-size", "8", "--no-progress"]


def run_cli(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exit_:  # argparse's own errors
        return int(exit_.code)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    save_tiny_model(root / "model", seed=5)
    write_tofu(root / "data", n=5, seed=6, jsonl=True)
    return root


def test_eval_prints_a_table_and_writes_the_report(world, tmp_path, capsys):
    out = tmp_path / "report.json"
    argv = ["eval", "--model", str(world / "model"), "--data", str(world / "data"), *SMALL]
    assert run_cli([*argv, "--out", str(out)]) == 0
    table = capsys.readouterr().out.splitlines()
    report = EvalReport.from_json(out.read_text())
    assert table[0].split() == ["metric", "value"]
    rows = dict(line.split() for line in table[1:])
    assert set(rows) == set(report.metrics) and "forget_quality" not in rows
    assert float(rows["forget_prob"]) == pytest.approx(report.metrics["forget_prob"], rel=1e-3)

    # the same numbers as evaluate() on the loaded model (default BOS/EOS from the tokenizer)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(world / "model", local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(world / "model", local_files_only=True)
    direct = evaluate(model, tokenizer, read_tofu(world / "data"), max_new_tokens=2, progress=False)
    assert report.metrics == pytest.approx(direct.metrics, rel=1e-6)

    # scored against itself: forget quality 1, privacy leakage 0
    again = tmp_path / "again.json"
    assert run_cli([*argv, "--retain-report", str(out), "--out", str(again)]) == 0
    rows = dict(line.split() for line in capsys.readouterr().out.splitlines()[1:])
    assert float(rows["forget_quality"]) == 1.0 and float(rows["privleak"]) == 0.0
    assert EvalReport.from_json(again.read_text()).metrics["forget_quality"] == 1.0

    # --adapter: the PEFT model's numbers, not the base model's
    peft_model = lora(model)
    peft_model.save_pretrained(tmp_path / "adapter")
    adapted = tmp_path / "adapted.json"
    assert run_cli([*argv, "--adapter", str(tmp_path / "adapter"), "--out", str(adapted)]) == 0
    got = EvalReport.from_json(adapted.read_text()).metrics
    want = evaluate(
        peft_model, tokenizer, read_tofu(world / "data"), max_new_tokens=2, progress=False
    ).metrics
    assert got == pytest.approx(want, rel=1e-6)
    assert got["forget_prob"] != pytest.approx(report.metrics["forget_prob"], rel=1e-3)


def _bad_flags(world, tmp_path) -> list[tuple[list[str], str]]:
    (tmp_path / "broken.json").write_text("{")
    other = EvalReport({"mink_auc": 0.5}, [1.0], [1.0], [1.0], {"forget_split": "forget05"})
    (tmp_path / "other.json").write_text(other.to_json())
    cases = [
        (["--batch-size", "0"], "--batch-size"),
        (["--max-new-tokens", "x"], "--max-new-tokens"),
        (["--min-k", "0"], "--min-k"),
        (["--min-k", "1.5"], "--min-k"),
        (["--forget-split", "forget5"], "--forget-split"),
        (["--forget-split", "forget05"], "--data"),  # no forget05 files
        (["--model", str(tmp_path)], "--model"),
        (["--adapter", str(tmp_path)], "--adapter"),
        (["--data", str(tmp_path / "none")], "--data"),
        (["--retain-report", str(tmp_path / "none.json")], "--retain-report"),
        (["--retain-report", str(tmp_path / "broken.json")], "--retain-report"),
        (["--retain-report", str(tmp_path / "other.json")], "--forget-split"),
        (["--out", str(tmp_path)], "--out"),
        (["--out", str(tmp_path / "deep" / "r.json")], "--out"),
        (["--tokenizer", str(tmp_path / "none.json")], "--tokenizer"),
        (["--model-dtype", "int8"], "--model-dtype"),
        (["--device", "cpu", "--device-map", "auto"], "--device-map"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda:0"], "--device"))
    return cases


def test_eval_checks_every_flag_before_loading(world, tmp_path, capsys, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("loaded before every flag was checked")

    monkeypatch.setattr(cli, "_load_model", refuse)
    monkeypatch.setattr("unlearn_kernels.data.formats.load_tokenizer", refuse)
    base = {"--model": str(world / "model"), "--data": str(world / "data")}
    for extra, flag in _bad_flags(world, tmp_path):
        override = dict(zip(extra[::2], extra[1::2], strict=True))
        argv = ["eval", *[x for kv in {**base, **override}.items() for x in kv], *SMALL]
        assert run_cli(argv) == 2, extra
        err = capsys.readouterr().err
        assert flag in err, (extra, err)
    assert not (tmp_path / "deep").exists()
    assert json.loads((tmp_path / "other.json").read_text())["version"] == 1
