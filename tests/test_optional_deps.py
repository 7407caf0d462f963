"""Optional dependencies (each missing one is one line naming its extra, shown by hiding the
module) and the command line's conventions (--version, python -m, -v/-q, defaults in --help)."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hf_helpers import hf_word_tokenizer, tiny_llama, word_tokenizer

import unlearn_kernels as uk
from unlearn_kernels import _deps
from unlearn_kernels._deps import OPTIONAL, MissingDependencyError, require
from unlearn_kernels.cli import build_parser, log_level, main
from unlearn_kernels.train.config import AdapterConfig, TrainConfig
from unlearn_kernels.train.model import attach_adapter, build_optimizer

ROOT = Path(__file__).resolve().parents[1]


def hide(monkeypatch, module: str) -> None:
    """``import module`` fails from now on in this test, as if it were not installed."""
    monkeypatch.setitem(sys.modules, module, None)


def one_line_naming(message: str, module: str) -> None:
    dist, extra, _ = OPTIONAL[module]
    assert "\n" not in message.strip(), message
    assert dist in message and f"pip install 'unlearn-kernels[{extra}]'" in message, message


@pytest.mark.parametrize("module", sorted(OPTIONAL))
def test_missing_module_is_one_line_naming_its_extra(monkeypatch, module):
    hide(monkeypatch, module)
    with pytest.raises(MissingDependencyError) as err:
        require(module, purpose="this feature")
    one_line_naming(str(err.value), module)
    assert str(err.value).startswith("this feature needs ")


def test_too_old_version_names_floor_and_found(monkeypatch):
    real = importlib.metadata.version
    monkeypatch.setattr(
        importlib.metadata,
        "version",
        lambda dist: "0.45.0" if dist == "bitsandbytes" else real(dist),
    )
    if importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes is not installed")
    with pytest.raises(MissingDependencyError, match=r"bitsandbytes>=0\.46\.1 \(found 0\.45\.0\)"):
        require("bitsandbytes", purpose="--load-in-4bit")
    assert _deps._release("2.13.0+cpu") == (2, 13, 0) and _deps._release("0.46.1") > (0, 46)


def test_floors_are_those_of_pyproject_extras():
    """The floors ``require`` checks are the extras' floors (one source of truth)."""
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    for module, (dist, extra, floor) in OPTIONAL.items():
        assert f"{dist}>={floor}" in extras[extra], (module, extras[extra])


@pytest.fixture
def local_model(tmp_path):
    model = tiny_llama(0)
    model.save_pretrained(tmp_path / "llama")
    hf_word_tokenizer().save_pretrained(tmp_path / "llama")
    word_tokenizer().save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "d.jsonl").write_text(json.dumps({"prompt": "w1 w2", "response": "w3"}) + "\n")
    argv = ["cache", "--model", str(tmp_path / "llama"), "--data", str(tmp_path / "d.jsonl")]
    return [*argv, "--out", str(tmp_path / "out" / "c")]


CACHE_NEEDS = [
    ("transformers", []),
    ("safetensors", []),
    ("tqdm", []),
    ("pydantic", []),
    ("accelerate", ["--device-map", "auto"]),
    ("bitsandbytes", ["--load-in-4bit"]),
    ("tokenizers", ["--tokenizer", "TOKENIZER_JSON"]),
]


@pytest.mark.parametrize(("module", "extra"), CACHE_NEEDS, ids=[m for m, _ in CACHE_NEEDS])
def test_cache_command_reports_a_missing_dependency(
    tmp_path, capsys, monkeypatch, local_model, module, extra
):
    """Exit status 1, one line on stderr naming the extra, nothing written."""
    extra = [str(tmp_path / "tokenizer.json") if a == "TOKENIZER_JSON" else a for a in extra]
    capsys.readouterr()  # the fixture's own output
    hide(monkeypatch, module)
    assert main([*local_model, *extra]) == 1
    err = capsys.readouterr().err
    one_line_naming(err, module)
    assert err.startswith("unlearn-kernels cache: error: ")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("module", ["pydantic", "yaml"])
def test_run_command_reports_a_missing_dependency(capsys, monkeypatch, module):
    hide(monkeypatch, module)
    assert main(["run", "--print-config", "ga"]) == 1
    one_line_naming(capsys.readouterr().err, module)


@pytest.mark.parametrize("module", ["scipy", "rouge_score"])
def test_eval_command_reports_a_missing_dependency(tmp_path, capsys, monkeypatch, module):
    hide(monkeypatch, module)
    assert main(["eval", "--model", str(tmp_path), "--data", str(tmp_path)]) == 1
    one_line_naming(capsys.readouterr().err, module)


def test_library_entry_points_report_a_missing_dependency(monkeypatch):
    model = tiny_llama(0)
    hide(monkeypatch, "safetensors")
    with pytest.raises(MissingDependencyError) as err:
        uk.ReferenceCache  # noqa: B018 (the lazy export checks on access)
    one_line_naming(str(err.value), "safetensors")
    hide(monkeypatch, "transformers")
    with pytest.raises(MissingDependencyError) as err:
        uk.patch  # noqa: B018
    one_line_naming(str(err.value), "transformers")
    hide(monkeypatch, "peft")
    with pytest.raises(MissingDependencyError) as err:
        attach_adapter(model, AdapterConfig(kind="lora"))
    one_line_naming(str(err.value), "peft")
    hide(monkeypatch, "bitsandbytes")
    with pytest.raises(MissingDependencyError, match=r"train\.optimizer: adamw8bit") as err:
        build_optimizer([torch.zeros(2, requires_grad=True)], TrainConfig(optimizer="adamw8bit"))
    one_line_naming(str(err.value), "bitsandbytes")


def test_import_needs_only_torch_and_numpy():
    """``import unlearn_kernels`` and a fused loss work with every optional package hidden."""
    hidden = sorted(OPTIONAL)
    code = (
        "import sys\n"
        f"for name in {hidden!r}: sys.modules[name] = None\n"
        "import torch, unlearn_kernels as uk\n"
        "h = torch.randn(3, 4, requires_grad=True)\n"
        "uk.fused_linear_cross_entropy(h, torch.randn(5, 4), torch.tensor([0, 1, 2])).backward()\n"
        "print(h.grad.abs().sum() > 0)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "tensor(True)"


def test_version_and_python_m():
    done = subprocess.run(
        [sys.executable, "-m", "unlearn_kernels", "--version"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"unlearn-kernels {uk.__version__}"


def subcommand_help(name: str) -> str:
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command")
    return " ".join(commands.choices[name].format_help().split())  # unwrapped


def test_help_shows_defaults_without_markup():
    text = subcommand_help("cache")
    for shown in (
        "(default: 32)",
        "(default: 8)",
        "(default: float32)",
        "(default: the tokenizer's)",
    ):
        assert shown in text, text
    assert "None" not in text and "[]" not in text and "``" not in text and ":mod:" not in text
    for name in ("run", "cache", "eval"):
        assert "-v, --verbose" in subcommand_help(name) and "-q, --quiet" in subcommand_help(name)
    assert "``" not in build_parser().format_help()


def test_log_level_flags(local_model, capsys):
    """Info messages by default, none with -q, debug with -v; the JSON summary on stdout."""
    capsys.readouterr()
    argv = [*local_model[:-1], local_model[-1] + "0", "--topk", "4"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["n_examples"] == 1
    assert "loading the reference model" in err and "wrote" in err and "INFO" in err
    assert "DEBUG" not in err
    argv = [*local_model[:-1], local_model[-1] + "1", "--topk", "4"]
    assert main([*argv, "-q"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["n_examples"] == 1 and "INFO" not in err
    argv = [*local_model[:-1], local_model[-1] + "2", "--topk", "4"]
    assert main([*argv, "-v"]) == 0
    assert "DEBUG arguments: {'command': 'cache'" in capsys.readouterr().err
    parser = build_parser()
    levels = [log_level(parser.parse_args(["run", *flags])) for flags in ([], ["-v"], ["-q"])]
    assert levels == [logging.INFO, logging.DEBUG, logging.WARNING]
    assert log_level(parser.parse_args(["run", "-qqq"])) == logging.ERROR
