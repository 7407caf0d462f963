"""The README's main job and the benchmark pages run end to end at a tiny shape."""

from __future__ import annotations

import json

from benchmarks import bench_cross_entropy, bench_kl, side_by_side
from benchmarks.harness import ROOT

TINY = ["--n", "48", "--d", "16", "--vocab", "300", "--repeats", "1"]


def test_side_by_side_agrees(capsys):
    assert side_by_side.main(TINY) == 0
    out = capsys.readouterr().out
    assert "cross-entropy" in out and "forward KL" in out and "failed" not in out


def test_kl_page(tmp_path):
    out = tmp_path / "kl.md"
    jobs = ["kl_fused", "kl_unfused", "topk_fused", "kl_time", "topk_time"]
    bench_kl.main([*TINY, "--configs", *jobs, "--out", str(out)])
    results = json.loads(out.with_suffix(".json").read_text())["results"]
    assert all("error" not in results[job] for job in jobs), results
    fused, unfused = results["kl_fused"]["value"], results["kl_unfused"]["value"]
    assert abs(fused - unfused) <= 1e-5 * abs(unfused)
    assert "exact KL / its 3 products" in out.read_text()


def test_methods_page(tmp_path):
    from benchmarks import bench_methods

    out = tmp_path / "methods.md"
    tiny = ["--vocab", "300", "--d", "32", "--seq", "20", "--prompt", "8", "--batch", "2"]
    assert bench_methods.main([*tiny, "--rounds", "1", "--configs", "yao", "--out", str(out)]) == 0
    results = json.loads(out.with_suffix(".json").read_text())["results"]
    first = results["yao/time"]["first_step"]
    for term in ("forget_nll", "mismatch_nll", "retain_kl"):
        assert (
            abs(first["fused"][term] - first["unfused"][term])
            <= 1e-5 * abs(first["unfused"][term]) + 1e-7
        )
    assert "| yao |" in out.read_text()


def test_cross_entropy_options_page(tmp_path):
    """Options mode at a tiny shape (some rows valid), this tree standing in for the baseline."""
    out = tmp_path / "options.md"
    shape = ["--n", "600", "--d", "16", "--vocab", "300", "--repeats", "1", "--frozen"]
    bench_cross_entropy.main(
        [*shape, "--options", "--baseline", "HEAD", "--baseline-dir", str(ROOT), "--out", str(out)]
    )
    (result,) = json.loads(out.with_suffix(".json").read_text())["results"]
    ours, base = result["ours"], result["baseline"]
    assert "error" not in ours and "error" not in base, result
    assert ours["off"]["value"] == base["off"]["value"] > 0
    assert ours["on"]["value"] != ours["off"]["value"]
    assert "smoothing + z-loss + accuracy" in out.read_text()


def test_cross_entropy_compare_page_imports_the_baseline_package(tmp_path):
    """Compare mode at a tiny shape; the baseline worker imports the package of --baseline-dir
    (a link to this tree's here), not this tree's."""
    baseline = tmp_path / "baseline"
    baseline.mkdir()
    (baseline / "unlearn_kernels").symlink_to(ROOT / "unlearn_kernels")
    out = tmp_path / "compare.md"
    shape = ["--n", "600", "--d", "16", "--vocab", "300", "--repeats", "1", "--frozen"]
    bench_cross_entropy.main(
        [
            *shape,
            "--compare",
            "--baseline",
            "HEAD",
            "--baseline-dir",
            str(baseline),
            "--out",
            str(out),
        ]
    )
    ((result,),) = [run["results"] for run in json.loads(out.with_suffix(".json").read_text())]
    ours, base = result["ours"], result["baseline"]
    assert base["package"].startswith(str(baseline)) and not ours["package"].startswith(
        str(baseline)
    )
    assert ours["off"]["value"] == base["off"]["value"] > 0
    assert "| this tree |" in out.read_text()
