"""Smoke tests of the benchmark scripts (their numbers are not asserted, only that they
measure what they claim on tiny models), of their JSON results and of the report that
turns those into docs/performance.md."""

import json
import math
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from benchmarks import accelerator, anchor, common, report
from experiments.configs import anchors_classifier, anchors_density

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _benchmark_settings():
    """The scripts' settings (``tuning.setup()``: non-partitionable threefry on CPU) for
    every test, so that their programs are the same (the tests share one model's compiled
    init through the compilation cache); restored afterwards."""
    value = jax.config.jax_threefry_partitionable
    common.setup([])
    yield
    jax.config.update("jax_threefry_partitionable", value)


def _run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_anchor_times_its_keys_on_tiny_models(tmp_path):
    r = anchor.main(["--tiny", "--only", "density.forward,classifier.inverse_tol_plain",
                     "--repeats", "1", "--warmup", "0", "--results_dir", str(tmp_path)])
    assert r["density.forward"] > 0 and r["density.forward.compile"] > 0
    assert r["classifier.inverse_tol"] == r["classifier.inverse_tol_plain"]
    assert r["classifier.inverse_tol.method"] == "plain"
    assert r["classifier.inverse_tol.recon_error"] < 1e-5
    assert 1 <= r["classifier.inverse_tol.iterations_per_block"] <= 100
    assert r["ratio.density.forward"] == r["density.forward"] / 0.0220
    assert r["conv"] == {"density": "hybrid", "classifier": "matmul"} or (
        jax.default_backend() != "cpu")
    assert (tmp_path / "anchor_tiny.json").exists()
    assert anchor.select(["density.inverse_tol"]) == ["density.inverse_tol_plain",
                                                       "density.inverse_tol_anderson"]
    assert anchor.select(["density.train"]) == ["density.train"]
    with pytest.raises(SystemExit):
        anchor.main(["--only", "density.nothing"])


def test_time_train_step_runs_the_library_step_and_reports_memory():
    # the tiny classifier of benchmarks.anchor --tiny (its init is compiled once)
    r = accelerator.time_train_step(anchors_classifier.get_config(), 4, (8, 8, 1), repeats=2,
                                    **anchor.TINY["classifier"])
    assert r["batch"] == 4 and r["params"] > 0
    assert math.isfinite(r["loss"]) and r["step_seconds"] > 0
    assert r["examples_per_second"] == 4 / r["step_seconds"]


def test_precision_check_reconstructs_on_cpu_at_both_precisions():
    r = accelerator.precision_check(anchors_density.get_config().model,
                                    anchor.TINY["density"], 4, (8, 8, 1))
    if jax.default_backend() == "cpu":   # no TF32 on CPU: both precisions are float32
        assert r["default"]["recon_max_abs_error"] < 1e-5
        assert r["log_prob_difference_default_vs_highest"] < 1e-3
    assert r["highest"]["recon_max_abs_error"] < 1e-5
    assert np.isfinite(r["default"]["log_prob_first"])


def test_accelerator_writes_its_sections_under_the_device_name(tmp_path):
    r = accelerator.main(["--tiny", "--sections", "device", "--results_dir", str(tmp_path)])
    assert r["device"]["matmul_tflops_f32_default"] > 0 and r["tiny"]
    saved = json.loads((tmp_path / "accelerator_tiny.json").read_text())
    assert saved["results"]["device"] == r["device"]
    if jax.default_backend() == "cpu":
        assert accelerator.result_name(tiny=False) == "accelerator_cpu"


def test_compile_and_time_splits_the_compile_and_returns_the_output():
    x = np.arange(6.0, dtype=np.float32).reshape(2, 3)
    r = common.compile_and_time(lambda a: jax.numpy.tanh(a) @ a.T, x, repeats=2, warmup=1)
    np.testing.assert_allclose(np.asarray(r["output"]), np.tanh(x) @ x.T, rtol=1e-6)
    assert r["compile_lower"] > 0 and r["compile_xla"] > 0
    assert r["compile_lower"] + r["compile_xla"] == pytest.approx(r["compile"])
    if "compile_cpu" in r:   # where the resource module exists
        assert r["compile_cpu"] > 0
    assert r["median"] >= r["min"] > 0
    assert r["flops"] is None or r["flops"] >= 0
    memory = common.memory_analysis(r["compiled"])
    assert not memory or memory["total_gib"] >= 0


def test_write_records_results_machine_command_and_time(tmp_path):
    path = common.write("example", {"b": 2.0, "a": np.float32(1.5)},
                        "python -m benchmarks.example --x 1", str(tmp_path), echo=False)
    text = open(path).read()
    data = json.loads(text)
    assert set(data) == {"benchmark", "command", "machine", "results", "timestamp_utc"}
    assert data["benchmark"] == "example" and data["results"] == {"a": 1.5, "b": 2.0}
    assert data["command"] == "python -m benchmarks.example --x 1"
    assert data["timestamp_utc"].endswith("UTC")
    machine = data["machine"]
    assert machine["cpu_count"] >= 1 and machine["versions"]["jax"] == jax.__version__
    assert machine["backend"] == jax.default_backend() and "device_kind" in machine
    assert "git_commit" in machine and "glibc_tunables" in machine["allocator"]
    assert text == json.dumps(data, indent=1, sort_keys=True) + "\n"
    assert common.command("anchor", ["--only", "density train"]) == (
        "python -m benchmarks.anchor --only 'density train'")


def test_anchor_flop_rate_is_taken_against_the_higher_matmul_rate():
    results = {"density.train_logdet.flops": 9e9, "density.train_logdet.gflops_per_s": 45.0,
               "matmul_gflops": 150.0, "matmul_gflops_at_end": 180.0}
    anchor.summarize(results)
    assert results["density.train_logdet.fraction_of_matmul_rate"] == 45.0 / 180.0
    del results["matmul_gflops_at_end"]
    anchor.summarize(results)
    assert results["density.train_logdet.fraction_of_matmul_rate"] == 45.0 / 150.0


def test_anchor_ratios_to_a_reference_measured_on_this_machine():
    """``benchmarks.anchor --reference FILE``: our time over the measured reference's,
    with the same pairing as the ratios to reference.json (the tolerance inverse against
    their 20-iteration inverse, the Neumann step against their 5-term log-det step)."""
    results = {"density.train_logdet": 0.3, "density.train_logdet_neumann": 0.15,
               "density.inverse_tol": 0.05, "classifier.forward": 0.06}
    measured = {"density.train_logdet": 0.6, "density.inverse20": 0.25,
                "classifier.forward": 0.04, "torch": "2.13.0", "matmul_gflops": 150.0}
    anchor.summarize_measured_reference(results, measured)
    assert results["ratio_measured.density.train_logdet"] == 0.5
    assert results["ratio_measured.density.train_logdet_neumann"] == 0.25
    assert results["ratio_measured.density.inverse_tol"] == 0.2
    assert results["ratio_measured.classifier.forward"] == 1.5
    assert results["reference_measured.torch"] == "2.13.0"
    assert "ratio_measured.density.train" not in results   # neither side has it


def test_reference_torch_names_a_missing_checkout_and_needs_no_jax(tmp_path):
    r = _run("-c", "import sys; from benchmarks import reference_torch; "
             f"reference_torch.main(['--repo', {str(tmp_path)!r}])")
    assert r.returncode != 0 and "models/conv_iResNet.py" in r.stderr
    r = _run("-c", "import sys; import benchmarks.reference_torch, benchmarks.report; "
             "assert 'jax' not in sys.modules, 'reference_torch or report imports JAX'")
    assert r.returncode == 0, r.stderr


def test_side_by_side_pairs_keys_as_the_reference_does():
    from benchmarks import side_by_side  # noqa: F401  (imports without a cycle)
    assert common.reference_key("density.inverse_tol_plain") == "density.inverse20"
    assert common.reference_key("classifier.inverse_tol_anderson") == "classifier.inverse20"
    assert common.reference_key("density.train_logdet_neumann") == "density.train_logdet"
    assert common.reference_key("classifier.train") == "classifier.train"
    # Every key it times has a counterpart that benchmarks.reference_torch builds.
    built = {"density.forward", "density.train", "density.train_logdet", "density.inverse20",
             "classifier.forward", "classifier.train", "classifier.inverse20"}
    assert {common.reference_key(k) for k in anchor.KEYS} == built == set(
        common.REFERENCE["seconds"])


def test_benchmark_modules_share_only_public_names_without_cycles():
    import ast
    import glob
    graph = {}
    for path in glob.glob(os.path.join(ROOT, "benchmarks", "*.py")):
        tree = ast.parse(open(path).read())
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("benchmarks"):
                names = [a.name for a in node.names]
                if node.module == "benchmarks":
                    deps.update(names)
                else:
                    deps.add(node.module.split(".")[1])
                    assert not [n for n in names if n.startswith("_")], (path, names)
        for node in ast.walk(tree):   # module._name of another benchmark module
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in deps):
                assert not node.attr.startswith("_"), (path, node.value.id, node.attr)
        graph[os.path.basename(path)[:-3]] = deps
    done: set = set()
    while len(done) < len(graph):   # peel off modules whose imports are all done
        ready = {m for m, deps in graph.items() if m not in done and deps <= done}
        assert ready, f"import cycle among {sorted(set(graph) - done)}"
        done |= ready
    assert graph["common"] == set() and graph["report"] == {"common"}


def test_estimator_benchmarks_run_at_tiny_sizes(tmp_path):
    from benchmarks import inverse, neumann
    tiny = ["--shape", "2,4,4,2", "--width", "4", "--repeats", "1",
            "--results_dir", str(tmp_path)]
    r = neumann.main(["--quick"] + tiny)
    assert r["series5.autodiff.loss"] == pytest.approx(r["series5.neumann.loss"])
    assert r["series5.autodiff.mode"] == "split" and r["series5.neumann.mode"] == "vjp"
    assert r["series5.neumann.memory"] == {} or r["series5.neumann.memory"]["temp_gib"] >= 0
    r = inverse.main(["--coeffs", "0.9", "--weights", "random"] + tiny)
    row = r["random.c=0.9"]
    for method in inverse.METHODS:
        assert row[method]["all_converged"] and row[method]["max_error"] < 1e-5
    found = report.load(str(tmp_path))
    assert {"neumann", "inverse"} <= set(found)
    assert report.neumann(found["neumann"]["results"])[0].startswith("| estimator")
    assert any("c = 0.9" in line for line in report.inverse(found["inverse"]["results"]))


def test_report_check_passes_on_the_committed_page_and_fails_after_an_edit(tmp_path):
    r = _run("-m", "benchmarks.report", "--check")
    assert r.returncode == 0, r.stdout + r.stderr
    doc, results = tmp_path / "performance.md", tmp_path / "results"
    shutil.copytree(os.path.join(ROOT, "benchmarks", "results"), results)
    text = open(os.path.join(ROOT, "docs", "performance.md")).read()
    assert "<!-- begin: accelerator -->\n| measure |" in text   # the committed H200 run
    assert "Not measured yet: run `python -m benchmarks.neumann`." in text or (
        (results / "neumann.json").exists())
    edited = text.replace("| matmul TFLOP/s, bfloat16 | 662 |",
                          "| matmul TFLOP/s, bfloat16 | 700 |")
    assert edited != text
    doc.write_text(edited)
    args = ["--pages", str(doc), "--results_dir", str(results)]
    assert report.main(args + ["--check"]) == 1
    assert report.main(args) == 0 and doc.read_text() == text   # regenerated
    assert report.main(args + ["--check"]) == 0
    doc.write_text(text + "<!-- begin: nope -->\n<!-- end: nope -->\n")
    with pytest.raises(ValueError, match="unknown result blocks"):
        report.main(args)
