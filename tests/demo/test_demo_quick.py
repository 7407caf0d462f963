"""``unlearn-kernels demo --quick`` end to end at a tiny size: its outputs, their keys and sane
values, the cache reused by a repeat run."""

from __future__ import annotations

import csv
import json
from dataclasses import replace

import pytest

from unlearn_kernels.cli import main
from unlearn_kernels.demo.base import BaseSettings
from unlearn_kernels.demo.run import RESULT_KEYS, DemoSettings, MethodSettings, run_demo
from unlearn_kernels.demo.world import WorldSettings

pytestmark = pytest.mark.hf

TINY = DemoSettings.quick(
    world=WorldSettings(n_authors=10, n_holdout=1, n_countries=4, n_retain_eval=30),
    base=BaseSettings(
        hidden_size=32, layers=2, heads=2, intermediate_size=64, epochs=20, batch_size=16, lr=2e-2
    ),
    method_settings={"ngdiff": MethodSettings(steps=4, lr=1e-3, r=4)},
    eval_every=2,
    probe_items=8,
    max_new_tokens=12,
)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    results = run_demo(TINY, root / "out", root / "cache", progress=False, echo=lambda _: None)
    return root, results


def test_outputs_have_the_documented_keys(demo):
    root, results = demo
    out = root / "out"
    saved = json.loads((out / "results.json").read_text())
    assert saved["records"] == results["records"]
    methods = [r["method"] for r in saved["records"]]
    assert methods == ["target", "retain_only", "ngdiff"]
    for record in saved["records"]:
        assert set(RESULT_KEYS) <= set(record)
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == methods and list(rows[0]) == list(RESULT_KEYS)
    for name in ("probability_over_steps.png", "forget_quality_vs_utility.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_values_are_sane(demo):
    _, results = demo
    rows = {r["method"]: r for r in results["records"]}
    target, only, ngdiff = rows["target"], rows["retain_only"], rows["ngdiff"]
    assert target["forget_prob"] > only["forget_prob"]  # the target knows the forget facts
    assert only["forget_quality"] == 1.0 and target["forget_quality"] < 1.0
    assert only["privleak"] == 0.0
    for r in rows.values():
        for key in ("forget_prob", "retain_prob", "forget_rouge", "model_utility"):
            assert 0.0 <= r[key] <= 1.0
        assert 0.0 <= r["forget_quality"] <= 1.0
    assert ngdiff["seconds"] > 0 and ngdiff["unfused_seconds"] > 0
    assert ngdiff["peak_bytes"] >= 0 and ngdiff["unfused_peak_bytes"] >= 0
    assert target["seconds"] is None
    curve = results["curves"]["ngdiff"]
    assert [c["step"] for c in curve] == [0, 2, 4]
    assert curve[0]["forget_prob"] == pytest.approx(target["forget_prob"], abs=0.2)
    assert results["validity"]["retain_only_self_forget_quality"] == 1.0


def test_repeat_run_reuses_the_cache(demo):
    root, first = demo
    settings = replace(TINY, compare_unfused=False)
    again = run_demo(settings, root / "out2", root / "cache", progress=False, echo=lambda _: None)
    assert (
        again["base_models"]["target"]["cached"] and again["base_models"]["retain_only"]["cached"]
    )
    assert again["records"][:2] == first["records"][:2]  # the cached reports, the same models


def test_cli_rejects_bad_flags(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--forget-split", "forget07"])
    assert "--forget-split" in capsys.readouterr().err
