"""Regenerates the result tables of README.md and docs/*.md from benchmarks/results/*.json.

Each table lives between ``<!-- begin: NAME -->`` and ``<!-- end: NAME -->`` and is
followed by the command that produced it and the machine and date of the run; a
benchmark without results gets a line naming the command to run. ``--check`` changes
nothing and exits with status 1 if a page differs from what it would write (the tests
run it, so the tables are never edited by hand).

    python -m benchmarks.report            # rewrite the tables
    python -m benchmarks.report --check
"""

from __future__ import annotations

import argparse
import difflib
import glob
import json
import os
import re
import sys

from benchmarks import common

PAGES = [os.path.join(common.ROOT, "README.md")] + sorted(
    glob.glob(os.path.join(common.ROOT, "docs", "*.md")))
BLOCK = re.compile(r"(<!-- begin: (\w+) -->\n)(.*?)(<!-- end: \2 -->)", re.S)

ANCHOR_ROWS = (
    ("density.forward", "density: evaluation forward, no log-det"),
    ("density.train", "density: training step, no log-det"),
    ("density.train_logdet", "density: training step, 5-term log-det, autodiff gradient"),
    ("density.train_logdet_neumann", "density: the same, Neumann gradient"),
    ("density.inverse20", "density: inverse, 20 iterations per block"),
    ("density.inverse_tol", "density: inverse to an error of 1e-6"),
    ("classifier.forward", "classifier: evaluation forward"),
    ("classifier.train", "classifier: training step"),
    ("classifier.inverse20", "classifier: inverse, 20 iterations per block"),
    ("classifier.inverse_tol", "classifier: inverse to an error of 1e-6"))
LABELS = dict(ANCHOR_ROWS)


def num(value, digits: int = 3) -> str:
    """``value`` to ``digits`` significant digits ("–" for a missing one)."""
    if value is None:
        return "–"
    if isinstance(value, str):
        return value
    return f"{value:.{digits}g}" if abs(value) < 10 ** digits else f"{value:.0f}"


def table(header, rows) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(num(c) for c in row) + " |" for row in rows])


def provenance(env: dict) -> str:
    """The command, machine, versions, code revision and date of one results file."""
    m = env.get("machine", {})
    if m.get("backend", "cpu") == "cpu" and "cpu_model" in m:
        where = f"{m['cpu_model']} ({m.get('cpus_available')} CPUs)"
    else:
        where = f"{m.get('device_kind')} ({m.get('backend')})"
    versions = ", ".join(f"{k} {m['versions'][k]}" for k in ("jax", "jaxlib", "flax", "torch")
                         if k in m.get("versions", {}))
    commit = m.get("git_commit")
    revision = (f"commit {commit[:10]}" + (" with local changes" if m.get("git_dirty") else "")
                if commit else "code revision unknown")
    text = (f"`{env['command']}` on {where}; {versions}; {revision}; "
            f"{env.get('timestamp_utc') or 'time unknown'}.")
    return text + (f" Note: {env['note']}." if env.get("note") else "")


def met(value, goal, at_most: bool = True) -> str:
    if value is None:
        return "–"
    return "yes" if (value <= goal if at_most else value >= goal) else "no"


def anchor(r: dict) -> list[str]:
    measured = any(k.startswith("ratio_measured.") for k in r)
    header = ["step", "ours (s)", "official (s)", "ours / official", "compile (s)"]
    rows = []
    for key, label in ANCHOR_ROWS:
        if key not in r:
            continue
        if key.endswith("inverse_tol"):
            label += (f" ({r.get(key + '.method')}, "
                      f"{num(r.get(key + '.iterations_per_block'), 2)} iterations per block)")
        ref = common.reference_key(key)
        if ref != key:
            label += f" [official: {LABELS[ref].split(': ')[1]}]"
        row = [label, r[key], r.get(f"reference.{ref}"), r.get(f"ratio.{key}"),
               r.get(f"{key}.compile")]
        rows.append(row + ([r.get(f"ratio_measured.{key}")] if measured else []))
    if measured:
        header.append("ours / official timed here")
    lines = table(header, rows)
    lines += ["", "Seconds per call, medians; \"official\": `benchmarks/reference.json` "
              "(docs/reference.md). Parameters: "
              f"{num(r.get('density.num_params'), 6)} (density), "
              f"{num(r.get('classifier.num_params'), 6)} (classifier); convs: "
              f"{', '.join(f'{k} {v}' for k, v in sorted(r.get('conv', {}).items()))}."]
    return lines


def anchor_goals(r: dict) -> list[str]:
    rows = []
    for key, goal in common.REFERENCE["goals"].items():
        if f"ratio.{key}" in r:
            ratio, here = r[f"ratio.{key}"], r.get(f"ratio_measured.{key}")
            rows.append([LABELS[key], f"≤ {goal}", ratio, here,
                         met(here if here is not None else ratio, goal)])
    overheads = {k.split(".", 1)[1]: v for k, v in r.items()
                 if k.startswith("logdet_overhead.")}
    if overheads:
        best = min(overheads, key=overheads.get)
        rows.append([f"log-det overhead (best: {best})", f"≤ {common.LOGDET_OVERHEAD_GOAL}",
                     overheads[best], None, met(overheads[best], common.LOGDET_OVERHEAD_GOAL)])
    if "max_compile_seconds" in r:
        rows.append(["longest compile (s)", f"< {common.COMPILE_GOAL_SECONDS}",
                     r["max_compile_seconds"], None,
                     met(r["max_compile_seconds"], common.COMPILE_GOAL_SECONDS)])
    fraction = r.get("density.train_logdet.fraction_of_matmul_rate")
    if fraction is not None:
        rows.append(["log-det step's FLOP rate / matmul rate", f"≥ {common.FLOP_RATE_GOAL:.2f}",
                     fraction, None, met(fraction, common.FLOP_RATE_GOAL, at_most=False)])
    lines = table(["goal", "target", "ours (reference.json)", "ours (official timed here)",
                   "met"], rows)
    lines += ["", "\"met\" judges the ratio to the official code timed on the same machine "
              "where the run has one (`--reference`), else the ratio to "
              "`benchmarks/reference.json`. Matmul rate in this run: "
              f"{num(r.get('matmul_gflops'))} GFLOP/s at its start, "
              f"{num(r.get('matmul_gflops_at_end'))} at its end "
              f"(the reference machine's: {num(common.REFERENCE['matmul_gflops'])})."]
    return lines


def side_by_side(r: dict) -> list[str]:
    order = [k for k, _ in ANCHOR_ROWS]
    keys = sorted((k for k, e in r.items() if isinstance(e, dict) and "ratio" in e),
                  key=lambda k: (order.index(k.removesuffix("_plain").removesuffix(
                      "_anderson")), k))
    rows = [[k, r[k]["ours"], r[k]["reference"], r[k]["ratio"], r[k].get("goal"),
             r[k]["compile"]] for k in keys]
    lines = table(["key", "ours (s)", "official (s)", "ours / official", "goal",
                   "compile (s)"], rows)
    lines += ["", f"Medians of {r['rounds']} interleaved rounds of {r['calls_per_round']} "
              f"calls; matmul rates {num(r['matmul_gflops_xla'])} GFLOP/s (XLA), "
              f"{num(r['matmul_gflops_torch'])} (torch)."]
    return lines


def reference_torch(r: dict) -> list[str]:
    rows = [[key, r[key], r.get(f"{key}.min"), seconds]
            for key, seconds in common.REFERENCE["seconds"].items() if key in r]
    lines = table(["key", "official, this machine (s)", "min (s)", "reference.json (s)"],
                  rows)
    lines += ["", f"torch {r.get('torch')}, {r.get('threads')} threads; max reconstruction "
              f"error after 20 iterations {num(r.get('density.inverse20.recon_error'), 2)} "
              f"(density), {num(r.get('classifier.inverse20.recon_error'), 2)} (classifier)."]
    return lines


def block(r: dict) -> list[str]:
    rows = []
    order = ["forward"] + [f"{f}_logdet_{m}" for f in ("forward", "grad")
                           for m in ("vjp", "jvp", "split")] + ["inverse_tol1e-6"]
    for key in [k for k in order if k in r]:
        if key.startswith("grad"):
            note = f"{num(r.get(key + '.gflops_per_s'))} GFLOP/s"
        elif key.startswith("inverse"):
            note = (f"{r.get(key + '.max_iterations')} iterations, error "
                    f"{num(r.get(key + '.recon_error'), 2)}")
        else:
            note = ""
        rows.append([key, 1e3 * r[key], r[key + ".compile"], note])
    lines = table(["function", "ms", "compile (s)", "note"], rows)
    lines += ["", f"Input {'x'.join(map(str, r['shape']))}, width {r['width']}, "
              f"conv \"{r['conv']}\"."]
    return lines


def neumann(r: dict) -> list[str]:
    rows = []
    for name in ("series5", "series10", "series20", "roulette"):
        if f"{name}.autodiff" not in r:
            continue
        a, n = f"{name}.autodiff", f"{name}.neumann"
        rows.append([name, 1e3 * r[a], 1e3 * r[n], r[f"{name}.ratio_neumann_to_autodiff"],
                     f"{num(1024 * r[a + '.memory'].get('temp_gib', 0))} / "
                     f"{num(1024 * r[n + '.memory'].get('temp_gib', 0))}",
                     f"{num(r[a + '.compile'])} / {num(r[n + '.compile'])}"])
    lines = table(["estimator", "autodiff (ms)", "Neumann (ms)", "Neumann / autodiff",
                   "scratch memory (MiB)", "compile (s)"], rows)
    lines += ["", f"Gradient of one block, input {'x'.join(map(str, r['shape']))}, width "
              f"{r['width']}, conv \"{r['conv']}\"; memory and compile: autodiff / Neumann."]
    return lines


def inverse(r: dict) -> list[str]:
    rows = []
    for key, row in r.items():
        if isinstance(row, dict) and "plain" in row:
            p, a = row["plain"], row["anderson"]
            rows.append([key.replace(".c=", ", c = "), 1e3 * p["seconds"], 1e3 * a["seconds"],
                         row["time_ratio_anderson_to_plain"],
                         f"{p['g_evaluations_max']} / {num(p['g_evaluations_mean'])}",
                         f"{a['g_evaluations_max']} / {num(a['g_evaluations_mean'])}",
                         f"{num(p['max_error'], 2)} / {num(a['max_error'], 2)}"])
    lines = table(["weights, c", "plain (ms)", "Anderson (ms)", "Anderson / plain",
                   "evaluations plain (max / mean)", "Anderson (max / mean)",
                   "max error plain / Anderson"], rows)
    lines += ["", f"One branch, input {'x'.join(map(str, r['shape']))}, width {r['width']}, "
              f"tolerance {r['tol']}."]
    return lines


def density_model(r: dict) -> list[str]:
    rows = [[f"compile, {d} blocks per scale (s)", s]
            for d, s in r["compile_seconds_by_blocks_per_scale"].items()]
    rows.append([f"training step, batch {r['batch']} (s)", r["step_seconds"]])
    for key, label in (("memory", "no remat"), ("memory_remat", "per-block remat")):
        if key in r:
            rows.append([f"XLA memory, batch {r['memory_batch']}, {label}: scratch / total "
                         "(GiB)", f"{num(r[key].get('temp_gib'))} / "
                         f"{num(r[key].get('total_gib'))}"])
    lines = table(["measure", "value"], rows)
    lines += ["", f"{num(r['num_params'], 8)} parameters, {r['blocks_per_scale']} blocks "
              "per scale."]
    return lines


def accelerator(found: dict) -> list[str] | None:
    envs = {name: env for name, env in found.items()
            if name.startswith("accelerator_") and not env["results"].get("tiny")}
    if not envs:
        return None
    names = sorted(envs)
    rows: list[list] = []

    def row(label, fn):
        cells = []
        for name in names:
            try:
                cells.append(fn(envs[name]["results"]))
            except (KeyError, TypeError):   # a section not run, skipped or failed
                cells.append(None)
        rows.append([label] + cells)

    def step(s):
        return (f"{num(s['step_seconds'])} s ({num(s['examples_per_second'])}/s), compile "
                f"{num(s['compile_seconds'])} s, scratch {num(s['xla_memory']['temp_gib'])} GiB")

    row("batch: density / classifier / Table 5", lambda r: (
        f"{r['cifar10_density']['remat']['batch']} / {r['cifar10_classifier']['batch']} / "
        f"{r['table5']['batch']}"))
    row("Table 5 size", lambda r: (
        f"{'x'.join(map(str, r['table5']['shape']))}, {r['table5']['blocks']} blocks of "
        f"{r['table5']['hidden']} channels"))
    for key, label in (("f32_default", "float32, default precision"),
                       ("f32_highest", "float32, highest precision"), ("bf16", "bfloat16")):
        row(f"matmul TFLOP/s, {label}", lambda r, k=key: r["device"][f"matmul_tflops_{k}"])
    row("CIFAR-10 density step, remat", lambda r: step(r["cifar10_density"]["remat"]))
    row("CIFAR-10 density step, no remat", lambda r: step(r["cifar10_density"]["no_remat"]))
    row("CIFAR-10 classifier step", lambda r: step(r["cifar10_classifier"]))
    row("CIFAR-10 classifier epoch (s)",
        lambda r: r["cifar10_classifier"]["epoch_seconds_50k"])
    for model, label in (("glow", "Glow"), ("iresnet", "i-ResNet"),
                         ("iresnet_sn", "+ spectral norm"),
                         ("iresnet_sn_logdet", "+ spectral norm + log-det")):
        row(f"Table 5: {label}, s (ratio to Glow; paper)", lambda r, m=model: (
            f"{num(r['table5']['models'][m]['seconds'])} "
            f"({num(r['table5']['models'][m]['ratio_to_glow'])}; "
            f"{r['table5']['paper_seconds'][m]} s)"))
    row("inverse error at init, default / highest precision", lambda r: (
        f"{num(r['precision']['default']['recon_max_abs_error'], 2)} / "
        f"{num(r['precision']['highest']['recon_max_abs_error'], 2)}"))
    devices = [envs[n]["machine"].get("device_kind", n) for n in names]
    lines = table(["measure"] + devices, rows)
    for name in names:
        lines += ["", provenance(envs[name])]
    return lines


PROCESS_ROWS = (("toy.train", "main job: training step, batch 250"),
                ("classifier.train", LABELS["classifier.train"] + ", batch 64"),
                ("density.train_logdet", LABELS["density.train_logdet"] + ", batch 64"))


def processes(r: dict) -> list[str]:
    n = r["processes"]
    rows = [[label, r[f"{key}.one"] * 1e3, r[f"{key}.processes"] * 1e3, r[f"{key}.ratio"]]
            for key, label in PROCESS_ROWS if f"{key}.one" in r]
    return table(["step", "1 process (ms)", f"{n} processes (ms)", f"{n} / 1"], rows)


def _seconds(s: float) -> str:
    return f"{s / 60:.1f} min" if s >= 120 else f"{s:.0f} s"


def runs_toy(r: dict) -> list[str]:
    m = r["metrics"]
    f = m["final"]
    rows = [["test NLL (nats, 20,000 held-out points)", f"{f['test_nll']:.3f}"],
            ["true NLL (ln 32) / gap", f"{num(m['true_nll'], 5)} / {m['gap_nats']:+.3f}"],
            ["steps (batch)", f"{f['step']} ({r.get('batch_size', 250)})"],
            ["steps per second (evaluations included)", f"{m['steps_per_sec']:.1f}"],
            ["whole command, compile included", _seconds(r["seconds"])],
            ["density's mass on the plotted square", f"{m['density_mass_on_plot_grid']:.4f}"],
            ["samples on the support", f"{m['sample_fraction_in_support']:.3f}"],
            ["parameters", num(m["parameters"], 6)]]
    for name, label in (("samples", "samples' inverse"), ("round_trip", "test points' round trip")):
        report = m.get("inverse", {}).get(name)
        if report:
            error = (f", largest error {report['max_error']:.1e}" if "max_error" in report
                     else "")
            rows.append([f"{label}: not converged / worst residual{', error' if error else ''}",
                         f"{report['not_converged']} of {report['examples']} / "
                         f"{report['worst_residual']:.1e}{error}"])
    return table(["measure", "value"], rows)


def runs_toy_compare(r: dict) -> list[str]:
    rows = [[row["dataset"], "i-ResNet" if row["model"] == "toy_iresnet" else "Glow",
             row["parameters"], row["final"]["step"], f"{row['final']['test_nll']:.3f}",
             "–" if row["true_nll"] is None else f"{row['true_nll']:.3f}",
             "–" if row["gap_nats"] is None else f"{row['gap_nats']:+.3f}",
             _seconds(row["seconds"])] for row in r["rows"]]
    return table(["dataset", "model", "parameters", "steps", "test NLL (nats)", "true NLL",
                  "gap", "wall time"], rows)


def _digits_result(run: dict) -> str:
    e = run["evaluation"]
    if "test_accuracy" in e:
        return f"accuracy {100 * e['test_accuracy']:.1f} %"
    return (f"{e['test_bits_per_dim']:.4f} ± {e['standard_error']:.4f} bits/dim (standard "
            f"error, {e['passes']} passes), bias ≤ {e['bias_bound']:.1e}")


DIGITS_LABELS = {"digits_classifier": "i-ResNet classifier, c = 0.9",
                 "digits_vanilla": "vanilla ResNet (no Lipschitz constraint)",
                 "digits_batchnorm": "BatchNorm ResNet",
                 "digits_density": "density i-ResNet, 3 × 4 blocks, c = 0.9"}


def runs_digits(r: dict) -> list[str]:
    rows = [[f"`{name}.py`", DIGITS_LABELS[name], num(run["metrics"]["parameters"], 6),
             _digits_result(run), _seconds(run["train"]["seconds"])]
            for name, run in ((n, r[n]) for n in DIGITS_LABELS if n in r)]
    return table(["config", "model", "parameters", "test result (`experiments.evaluate`)",
                  "training, compile included"], rows)


def runs_analyses(r: dict) -> list[str]:
    s = r["summary"]
    lines = []
    if "singular_values" in s:
        lines += ["**Largest singular value of any conv operator** (Fig. 6; FFT: circular "
                  "padding at the layer's size, power: the zero-padded operator):", ""]
        lines += table(["model", "FFT", "power iteration", "conv layers"],
                       [[m, v["max_fft"], v["max_power"], v["layers"]]
                        for m, v in s["singular_values"].items()]) + [""]
    if "reconstructions" in s:
        lines += ["**Reconstructions** (Fig. 7, 100 iterations per block):", ""]
        lines += table(["model", "max error", "mean error"],
                       [[m, v["max_error"], v["mean_error"]]
                        for m, v in s["reconstructions"].items()]) + [""]
    if "convergence" in s:
        lines += ["**Fixed-point convergence** (Fig. 8, after the most iterations):", ""]
        lines += table(["model", "iterations", "max error", "seconds per batch"],
                       [[m, v["iterations"], v["max_error"], v["seconds_per_batch"]]
                        for m, v in s["convergence"].items()]) + [""]
    if "logdet_bias" in s:
        b = s["logdet_bias"]
        lines += [f"**Log-det estimator** (Fig. 9; {b['examples']} examples × "
                  f"{b['probes_per_example']} probes; exact log-det of the residual blocks "
                  f"{num(b['exact_mean'])} nats on average):", ""]
        picks = [n for n in (1, 2, 5, 10, 20) if n <= len(b["series_bias"])]
        lines += table(["terms"] + [str(n) for n in picks],
                       [["bias of the series (exact)"] + [b["series_bias"][n - 1] for n in picks],
                        ["std of one Hutchinson estimate"]
                        + [b["estimate_std"][n - 1] for n in picks],
                        ["Theorem 3 bound"] + [b["theorem3_bound"][n - 1] for n in picks]])
        lines += [""]
    if "runtime" in s:
        lines += ["**Runtime** (Table 5, one forward + backward pass on this CPU):", ""]
        lines += table(["model", "seconds", "ratio to Glow"],
                       [[m, v["seconds"], v["ratio_to_glow"]] for m, v in s["runtime"].items()])
        lines += [""]
    lines += [f"The whole command took {_seconds(r['seconds'])}."]
    return lines


def headline(found: dict) -> list[str]:
    """The README's table: one row per headline result, with its command."""
    rows = []

    def add(what, name, fn, command):
        env = found.get(name)
        try:
            value = fn(env["results"]) if env else None
        except (KeyError, TypeError):
            value = None
        rows.append([what, value or "not measured yet", f"`{command}`"])

    add("toy checkerboard, test NLL (true 3.466)", "runs_toy", lambda r: (
        f"{r['metrics']['final']['test_nll']:.3f} nats in {_seconds(r['seconds'])} on 2 CPU "
        "cores"), "python -m benchmarks.runs toy")
    add("digits, i-ResNet / vanilla accuracy", "runs_digits", lambda r: (
        f"{100 * r['digits_classifier']['evaluation']['test_accuracy']:.1f} % / "
        f"{100 * r['digits_vanilla']['evaluation']['test_accuracy']:.1f} %"),
        "python -m benchmarks.runs digits")
    add("digits, density bits/dim", "runs_digits",
        lambda r: _digits_result(r["digits_density"]), "python -m benchmarks.runs digits")
    add("our time / the official PyTorch code's, interleaved on one CPU: log-det training "
        "step / with the Neumann gradient / classifier step / inverse to 1e-6 (theirs: 20 "
        "iterations)",
        "side_by_side", lambda r: " / ".join(num(r[k]["ratio"], 2) for k in (
            "density.train_logdet", "density.train_logdet_neumann", "classifier.train",
            "density.inverse_tol_plain")),
        "python -m benchmarks.side_by_side --repo PATH")
    add("one H200 (an earlier revision): CIFAR-10 density step (96 blocks, 512 filters, "
        "batch 64, remat)",
        "accelerator_h200", lambda r: (
            f"{num(r['cifar10_density']['remat']['step_seconds'])} s"),
        "python -m benchmarks.accelerator")
    add("one H200 (an earlier revision): CIFAR-10 classifier step (39 blocks, batch 128)",
        "accelerator_h200",
        lambda r: f"{num(r['cifar10_classifier']['step_seconds'])} s",
        "python -m benchmarks.accelerator")
    return table(["what", "result", "command"], rows) + [
        "", "Machines, versions and dates of each number: the provenance lines in docs/."]


# block name -> (its results file, or None for every accelerator file; the renderer; the
# command that measures it)
BLOCKS = {"anchor": ("anchor", anchor, "anchor"),
          "anchor_goals": ("anchor", anchor_goals, "anchor"),
          "side_by_side": ("side_by_side", side_by_side, "side_by_side --repo PATH"),
          "reference_torch": ("reference_torch", reference_torch, "reference_torch --repo PATH"),
          "block": ("block", block, "block"), "neumann": ("neumann", neumann, "neumann"),
          "inverse": ("inverse", inverse, "inverse"),
          "processes": ("processes", processes, "processes"),
          "density_model": ("density_model", density_model, "density_model"),
          "accelerator": (None, accelerator, "accelerator"),
          "runs_toy": ("runs_toy", runs_toy, "runs toy"),
          "runs_toy_compare": ("runs_toy_compare", runs_toy_compare, "runs toy_compare"),
          "runs_digits": ("runs_digits", runs_digits, "runs digits"),
          "runs_analyses": ("runs_analyses", runs_analyses, "runs analyses"),
          "headline": (None, headline, "runs")}


def load(results_dir: str) -> dict[str, dict]:
    """Every results file, by name."""
    found = {}
    for path in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
        with open(path) as f:
            found[os.path.basename(path)[:-5]] = json.load(f)
    return found


def render(text: str, found: dict) -> str:
    """``text`` with every block's table regenerated."""
    unknown = sorted({m.group(2) for m in BLOCK.finditer(text)} - set(BLOCKS))
    if unknown:
        raise ValueError(f"unknown result blocks {unknown}; known: {sorted(BLOCKS)}")

    def replace(m):
        name, fn, script = BLOCKS[m.group(2)]
        env = found.get(name)
        lines = (fn(found) if name is None else
                 fn(env["results"]) + ["", provenance(env)] if env else None)
        lines = lines or [f"Not measured yet: run `python -m benchmarks.{script}`."]
        return m.group(1) + "\n".join(lines) + "\n" + m.group(4)

    return BLOCK.sub(replace, text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if a page differs from what would be written")
    parser.add_argument("--pages", nargs="*", default=PAGES)
    parser.add_argument("--results_dir", default=common.RESULTS_DIR)
    args = parser.parse_args(argv)
    found = load(args.results_dir)
    stale = []
    for page in args.pages:
        with open(page) as f:
            text = f.read()
        new = render(text, found)
        if new == text:
            continue
        if args.check:
            sys.stdout.writelines(difflib.unified_diff(
                text.splitlines(True), new.splitlines(True), page, "generated"))
            stale.append(page)
        else:
            with open(page, "w") as f:
                f.write(new)
    if stale:
        print(f"{', '.join(stale)} out of date: run python -m benchmarks.report",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
