"""The GPU check's summary (``bench/device_check.sh`` prints it last) and its verdicts on the project's targets.

    python3 bench/device_summary.py OUTDIR
    python3 bench/device_summary.py --choose-train-backend OUTDIR     (call 2's sampler backend, from call 1)
    python3 bench/device_summary.py --merge-table OUTDIR [TABLE]      (the run's rows into backend="auto"'s table)

reads OUTDIR/{stages.tsv, check_info.tsv, parity.xml, bench.json, pytest_benchmark.json, cuda_tests.xml,
precision_tests.xml, kernel_sweep.xml, profile.json, train_backend.txt, train_run.tsv, train_run/metrics.csv,
evaluate/report.json} and prints the stages, the environment, the GPU tests' counts and printed PRECISION lines, the
kernel backends' parity, the sampler and training figures, the profile, the real training run, and the targets
judged from them (sampler speed and memory, the ``triton`` and ``persistent`` backends, training: met / NOT met / not
measured); it writes OUTDIR/summary.json (the training run's figures, ``measured_60_epochs_min`` among them, the
parity and the verdicts) and, for a CUDA run, OUTDIR/backend_rows.json (microseconds per step of each backend per
batch size, the rows ``ebmfast/backend_table.json`` takes). Measurements are reported, never asserted: this script
judges them, the library (``ebmfast.benchmark``) only measures. It needs only the Python standard library, so the
summary is written even when the package does not import.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys


def fmt(v, spec: str, none: str = "n/a") -> str:
    return none if v is None else format(v, spec)


SAMPLER_TARGETS = (
    "batch 128, 60 steps: graph >= 20x eager sample-steps/s (same run)",
    "batch 16384: >= 40% of measured fp32 matmul peak in achieved FLOP/s (TF32 reported separately)",
    "seed's 60-epoch MNIST training (batch 128, 60 steps) projected <= 3 minutes",
    "graph peak memory <= 2x eager at batch 128 (60 steps)",
)
CPU_SAMPLER_TARGET = "CPU, batch 128, 60 steps: best backend >= 1.5x eager sample-steps/s (aim 2x)"


def _verdict(ok: bool | None) -> str:
    return "not measured" if ok is None else ("met" if ok else "NOT met")


def sampler_target_report(doc: dict) -> list[str]:
    """The sampler's speed and memory targets judged from an ``ebmfast bench --json`` document: the GPU targets for a
    CUDA run, the CPU target for a CPU run. Reported, never asserted."""
    rows = [r for r in doc.get("sampler", []) if r.get("median_s")]
    cell = {(r["backend"], r["batch"], r["steps"]): r for r in rows}
    device = str(doc.get("environment", {}).get("device", ""))
    if not device.startswith("cuda"):
        e = cell.get(("eager", 128, 60))
        others = [r for (b, n, k), r in cell.items() if n == 128 and k == 60 and b != "eager"]
        best = max(others, key=lambda r: r["ratio_to_eager"] or 0.0, default=None)
        ok = None if (e is None or best is None) else best["ratio_to_eager"] >= 1.5
        return [
            f"[{_verdict(ok)}] {CPU_SAMPLER_TARGET}: "
            + ("n/a" if ok is None else f"{best['ratio_to_eager']:.2f}x ({best['backend']})")
        ]
    lines = []
    g, e = cell.get(("graph", 128, 60)), cell.get(("eager", 128, 60))
    ratio = g["ratio_to_eager"] if g and e else None
    lines.append(
        f"[{_verdict(None if ratio is None else ratio >= 20)}] {SAMPLER_TARGETS[0]}: "
        + ("n/a" if ratio is None else f"{ratio:.1f}x")
    )
    big = [r for r in rows if r["batch"] == 16384 and r.get("frac_fp32_peak") is not None]
    best = max(big, key=lambda r: r["frac_fp32_peak"], default=None)
    lines.append(
        f"[{_verdict(None if best is None else best['frac_fp32_peak'] >= 0.4)}] {SAMPLER_TARGETS[1]}: "
        + (
            "n/a"
            if best is None
            else f"{100 * best['frac_fp32_peak']:.1f}% fp32 / "
            f"{fmt(None if best.get('frac_tf32_peak') is None else 100 * best['frac_tf32_peak'], '.1f')}% "
            f"tf32 ({best['backend']}, {best['steps']} steps, {best['tflops']:.2f} TFLOP/s)"
        )
    )
    train = [
        r for r in doc.get("train", []) if r.get("projected_60_epochs_min") and r["batch"] == 128 and r["steps"] == 60
    ]
    bt = min(train, key=lambda r: r["projected_60_epochs_min"], default=None)
    lines.append(
        f"[{_verdict(None if bt is None else bt['projected_60_epochs_min'] <= 3.0)}] {SAMPLER_TARGETS[2]}: "
        + ("n/a" if bt is None else f"{bt['projected_60_epochs_min']:.2f} min ({bt['backend']})")
    )
    gm, em = (g or {}).get("peak_mem_mb"), (e or {}).get("peak_mem_mb")
    mem_ok = None if (gm is None or not em) else gm <= 2 * em
    lines.append(
        f"[{_verdict(mem_ok)}] {SAMPLER_TARGETS[3]}: "
        + ("n/a" if mem_ok is None else f"graph {gm:.1f} MB vs eager {em:.1f} MB ({gm / em:.2f}x)")
    )
    return lines


# ------------------------------------------------------------------------------ our own kernels: triton, persistent
TRITON_TARGETS = (
    "batch 128, 60 steps: triton >= 20x eager sample-steps/s (same run)",
    "triton: <= 14 kernels per step (profile, smallest batch)",
    "batch 16384: triton >= 40% of the measured fp32 matmul peak",
    "batch 16384: triton tf32 >= 2x its own fp32 throughput (profile)",
    "triton peak memory <= graph's (each batch both measured, 60 steps)",
)
PERSISTENT_TARGETS = (
    "batch 128, 60 steps: persistent >= 50x eager sample-steps/s (same run)",
    "batch 1, 60 steps: persistent >= 100x eager sample-steps/s (same run)",
    "batch 16384: persistent >= 40% of the measured fp32 matmul peak",
    "batch 16384: persistent tf32 and bf16 >= 2x its own fp32 throughput (profile)",
    "persistent: 1-2 kernels per chain (profile, smallest batch)",
    "persistent: first call (compile + one chain, cold Triton cache) <= 60 s",
    "batch 128, 60 steps: persistent <= 39 us per step",
)


def _is_cuda(doc: dict | None) -> bool:
    return str((doc or {}).get("environment", {}).get("device", "")).startswith("cuda")


def _sampler_cells(doc: dict | None) -> dict:
    """(backend, batch, steps) -> measured ``ebmfast bench`` sampler row."""
    return {(r["backend"], r["batch"], r["steps"]): r for r in (doc or {}).get("sampler", []) if r.get("median_s")}


def _profile_doc(outdir: str) -> dict:
    try:
        with open(os.path.join(outdir, "profile.json")) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return {}


def _variants(prof: dict) -> dict:
    """(backend, batch, precision) -> measured chain variant of ``profile_step.py`` (default layout only)."""
    rows = prof.get("chain_variants") or prof.get("graph_variants") or []
    return {
        (r["backend"], r["batch"], r["precision"]): r
        for r in rows
        if r.get("sample_steps_per_s") and not r.get("channels_last")
    }


def _profiled(prof: dict, backend: str) -> dict | None:
    """The kernel profile of ``backend`` at the smallest profiled batch (default layout)."""
    rows = [p for p in prof.get("profiles", []) if p.get("backend") == backend and not p.get("channels_last")]
    return min(rows, key=lambda p: p["batch"], default=None)


def _line(target: str, ok: bool | None, text: str | None, cuda: bool) -> str:
    if text is None:
        return f"[not measured] {target}: n/a"
    if not cuda:
        return f"[not measured] {target}: {text} [not CUDA: not judged]"
    return f"[{_verdict(ok)}] {target}: {text}"


def _ratio_line(target, cell, backend, batch, want, cuda) -> str:
    r = cell.get((backend, batch, 60))
    ratio = None if r is None else r.get("ratio_to_eager")
    text = None if ratio is None else f"{ratio:.1f}x ({r['sample_steps_per_s']:,.0f} sample-steps/s)"
    return _line(target, None if ratio is None else ratio >= want, text, cuda)


def _peak_line(target, doc, backend, cuda) -> str:
    rows = [
        r
        for r in (doc or {}).get("sampler", [])
        if r.get("backend") == backend and r.get("batch") == 16384 and r.get("frac_fp32_peak") is not None
    ]
    best = max(rows, key=lambda r: r["frac_fp32_peak"], default=None)
    text = (
        None
        if best is None
        else f"{100 * best['frac_fp32_peak']:.1f}% ({best['tflops']:.2f} TFLOP/s, {best['steps']} steps)"
    )
    return _line(target, None if best is None else best["frac_fp32_peak"] >= 0.4, text, cuda)


def _precision_line(target, variants, backend, precisions, cuda) -> str:
    base = variants.get((backend, 16384, "fp32"))
    parts, oks = [], []
    for p in precisions:
        v = variants.get((backend, 16384, p))
        if base is None or v is None:
            continue
        x = v["sample_steps_per_s"] / base["sample_steps_per_s"]
        parts.append(f"{p} {x:.2f}x")
        oks.append(x >= 2.0)
    text = None if not parts else ", ".join(parts) + f" of fp32's {base['sample_steps_per_s']:,.0f} sample-steps/s"
    ok = None if len(oks) < len(precisions) else all(oks)
    if parts and ok is None:
        text += " (not every precision measured)"
    return _line(target, ok, text, cuda)


def kernel_backend_report(doc: dict | None, prof: dict, cold_cache: bool = True) -> tuple[list[str], list[str]]:
    """The targets of our own kernel backends (``triton``, ``persistent``), judged from ``bench.json``
    (sample-steps/s, FLOP/s, memory, first call, time per step) and ``profile.json`` (kernels per step, reduced
    precisions). Reported, never asserted;
    figures from a CPU run are shown but not judged, and the compile time only when ``cold_cache`` (the run started
    with empty compile caches)."""
    cuda = _is_cuda(doc) or bool(prof)
    cell = _sampler_cells(doc)
    variants = _variants(prof)
    tt, pt = TRITON_TARGETS, PERSISTENT_TARGETS

    triton_lines = [_ratio_line(tt[0], cell, "triton", 128, 20, cuda)]
    p = _profiled(prof, "triton")
    triton_lines.append(
        _line(
            tt[1],
            None if p is None else p["kernels_per_step"] <= 14,
            None if p is None else f"{p['kernels_per_step']:.2f} kernels/step (batch {p['batch']})",
            cuda,
        )
    )
    triton_lines.append(_peak_line(tt[2], doc, "triton", cuda))
    triton_lines.append(_precision_line(tt[3], variants, "triton", ("tf32",), cuda))
    pairs = [
        (n, r["peak_mem_mb"], cell[("graph", n, k)]["peak_mem_mb"])
        for (b, n, k), r in sorted(cell.items(), key=lambda kv: kv[0][1])
        if b == "triton" and k == 60 and ("graph", n, k) in cell
        if r.get("peak_mem_mb") is not None and cell[("graph", n, k)].get("peak_mem_mb") is not None
    ]
    triton_lines.append(
        _line(
            tt[4],
            None if not pairs else all(t <= g for _, t, g in pairs),
            None if not pairs else ", ".join(f"batch {n}: {t:.1f} vs {g:.1f} MB" for n, t, g in pairs),
            cuda,
        )
    )

    persistent_lines = [
        _ratio_line(pt[0], cell, "persistent", 128, 50, cuda),
        _ratio_line(pt[1], cell, "persistent", 1, 100, cuda),
        _peak_line(pt[2], doc, "persistent", cuda),
        _precision_line(pt[3], variants, "persistent", ("tf32", "bf16"), cuda),
    ]
    p = _profiled(prof, "persistent")
    persistent_lines.append(
        _line(
            pt[4],
            None if p is None else 1 <= p["kernels"] <= 2,
            None if p is None else f"{p['kernels']} kernel(s) per {p['steps']}-step chain (batch {p['batch']})",
            cuda,
        )
    )
    firsts = [r for r in (doc or {}).get("sampler", []) if r.get("backend") == "persistent" and r.get("first_call_s")]
    worst = max(firsts, key=lambda r: r["first_call_s"], default=None)
    text = None
    if worst is not None:
        text = f"{worst['first_call_s']:.1f} s (batch {worst['batch']}, the slowest first call)"
        if not cold_cache:
            text += " [the run did not record a cold compile cache: not judged]"
    ok = None if worst is None or not cold_cache else worst["first_call_s"] <= 60
    persistent_lines.append(_line(pt[5], ok, text, cuda))
    r = cell.get(("persistent", 128, 60))
    us = None if r is None else 1e6 * r["median_s"] / 60
    persistent_lines.append(
        _line(pt[6], None if us is None else us <= 39.0, None if us is None else f"{us:.1f} us/step", cuda)
    )
    return triton_lines, persistent_lines


# ------------------------------------------------------------------------------ backend="auto"'s committed table
AUTO_TABLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "ebmfast", "backend_table.json")


def backend_rows(doc: dict | None) -> list[dict]:
    """Rows for ``ebmfast/backend_table.json`` from a CUDA ``ebmfast bench --json`` document: per batch size (the
    60-step cells, else the longest chain measured), microseconds per step of every backend measured beside ``graph``.
    Empty for a CPU run, a document without its model key, or batches where ``graph`` was not measured."""
    if not _is_cuda(doc) or not doc.get("model"):
        return []
    env, model = doc["environment"], doc["model"]
    cell = _sampler_cells(doc)
    rows = []
    for batch in sorted({n for _, n, _ in cell}):
        steps_here = sorted({k for b, n, k in cell if n == batch and b == "graph"})
        if not steps_here:
            continue
        steps = 60 if 60 in steps_here else steps_here[-1]
        times = {b: 1e6 * r["median_s"] / k for (b, n, k), r in cell.items() if n == batch and k == steps}
        rows.append(
            {
                "gpu": env.get("device_name"),
                "architecture": model.get("architecture"),
                "sample_shape": model.get("sample_shape"),
                "precision": model.get("precision", "fp32"),
                "batch": batch,
                "steps": steps,
                "us_per_step": {b: round(t, 3) for b, t in sorted(times.items())},
                "measured": f"{env.get('time')}, torch {env.get('torch')}, triton {env.get('triton')}",
            }
        )
    return rows


def merge_table(table_path: str, rows: list[dict]) -> dict:
    """The committed table with ``rows`` in it: a row for the same GPU, architecture, sample shape, precision and
    batch is replaced, the others kept."""
    try:
        with open(table_path) as fh:
            table = json.load(fh)
    except (OSError, ValueError):
        table = {}

    def key(r: dict) -> tuple:
        shape = tuple(r.get("sample_shape") or ())
        return (str(r.get("gpu")), str(r.get("architecture")), str(shape), str(r.get("precision")), r.get("batch") or 0)

    new = {key(r) for r in rows}
    kept = [r for r in table.get("rows", []) if key(r) not in new]
    table["rows"] = sorted(kept + rows, key=key)
    return table


# -------------------------------------------------------------------------------------------- the real training run
SEED_ITERATIONS = 60 * 468  # the seed's 60 epochs of full MNIST at batch 128
SEED_EPOCHS = 60
TRAINING_TARGETS = (
    "iteration time <= 1.15x the chain time of the same sampler backend (batch 128, 60 steps)",
    "the seed's 60 epochs (28,080 iterations, batch 128, 60 steps) <= 3 minutes wall clock",
)


def _read_tsv(path: str) -> dict:
    out = {}
    try:
        with open(path) as fh:
            for line in fh:
                key, sep, value = line.rstrip("\n").partition("\t")
                if sep:
                    out[key] = value
    except OSError:
        pass
    return out


def _read_lines(path: str) -> list[str]:
    try:
        with open(path) as fh:
            return [ln.strip() for ln in fh if ln.strip()]
    except OSError:
        return []


PARITY_BACKENDS = {"test_layers": "triton", "test_persistent": "persistent"}  # test module -> backend it checks


def parity_report(outdir: str) -> dict[str, str]:
    """{backend: "passed" / "FAILED" / "not run"} for ``triton`` and ``persistent`` from the parity stage's JUnit file
    (tests/test_layers.py checks the layer kernels, tests/test_persistent.py the persistent kernel,
    tests/test_sampler_kernels.py both, named in the case's parameters). Empty without the file."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.parse(os.path.join(outdir, "parity.xml")).getroot()
    except (OSError, ET.ParseError):
        return {}
    seen: dict[str, list[bool]] = {"triton": [], "persistent": []}
    for case in root.iter("testcase"):
        module = case.get("classname", "").rsplit(".", 1)[-1]
        name = case.get("name", "")
        backend = PARITY_BACKENDS.get(module)
        if backend is None:
            backend = next((b for b in seen if f"-{b}]" in name or f"[{b}" in name), None)
        if backend is None or case.find("skipped") is not None:
            continue
        seen[backend].append(case.find("failure") is None and case.find("error") is None)
    return {b: ("not run" if not oks else "passed" if all(oks) else "FAILED") for b, oks in seen.items()}


def choose_train_backend(outdir: str) -> tuple[str, str]:
    """(backend, why) for call 2's training: the fastest of ``graph`` (the trainer's default) and the kernel backends
    that passed parity, by ``bench.json``'s time per step at batch 128 and 60 steps; ``graph`` when nothing was
    measured."""
    passed = [b for b, v in parity_report(outdir).items() if v == "passed"]
    try:
        with open(os.path.join(outdir, "bench.json")) as fh:
            cell = _sampler_cells(json.load(fh))
    except (OSError, ValueError):
        cell = {}
    timed = {b: cell[(b, 128, 60)]["median_s"] / 60 for b in ["graph", *passed] if (b, 128, 60) in cell}
    if not timed:
        return "graph", "no batch-128 timing of graph or of a backend that passed parity: the trainer's default"
    best = min(timed, key=timed.get)
    ranked = sorted(timed.items(), key=lambda kv: kv[1])
    return best, "fastest at batch 128, 60 steps, of " + ", ".join(f"{b} {1e6 * t:.1f} us/step" for b, t in ranked)


def _metrics_csv(path: str) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    try:
        with open(path, newline="") as fh:
            for row in csv.DictReader(fh):
                try:
                    out.setdefault(row["metric"], []).append((int(row["step"]), float(row["value"])))
                except (KeyError, TypeError, ValueError):
                    continue
    except OSError:
        pass
    return out


def _num(text):
    try:
        v = float(text)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def train_run_report(outdir: str) -> dict | None:
    """The training stage's figures: what it asked for and did, its end-to-end wall time, the trainer's own timing
    (first iteration with compilation and capture, steady ms per iteration, median epoch end), the seed's 60 epochs
    projected from them (``measured_60_epochs_min``) and, when all 28,080 iterations ran, the whole run's wall time;
    rand_out at the seed's epoch ends; the evaluation's sample quality and OOD figures. None without a run."""
    info = _read_tsv(os.path.join(outdir, "train_run.tsv"))
    if not info:
        return None
    rep: dict = {k: info[k] for k in ("status", "command", "skip", "evaluate_skip", "backend") if k in info}
    for key in ("iterations_asked", "wall_s", "rc", "budget_s", "evaluate_rc", "evaluate_s"):
        if key in info:
            rep[key] = _num(info[key])
    try:
        with open(os.path.join(outdir, "env.log")) as fh:
            rep["cuda"] = "cuda available: True" in fh.read()
    except OSError:
        rep["cuda"] = False
    if "skip" in info:
        return rep
    metrics = _metrics_csv(os.path.join(outdir, "train_run", "metrics.csv"))
    losses = metrics.get("loss", [])
    rep["iterations_done"] = max((step for step, _ in losses), default=0)
    timing = {k[len("time/") :]: v[-1][1] for k, v in metrics.items() if k.startswith("time/") and v}
    rep["trainer_timing"] = timing
    first, it_ms, end_s = timing.get("first_iteration_s"), timing.get("iteration_ms"), timing.get("epoch_end_s")
    if first is not None and it_ms is not None:
        minutes = (first + SEED_ITERATIONS * it_ms / 1e3 + SEED_EPOCHS * (end_s or 0.0)) / 60.0
        rep["measured_60_epochs_min"] = minutes
        rep["measured_60_epochs_basis"] = (
            f"projected from this run's steady per-iteration time ({rep['iterations_done']} iterations of "
            "ebmfast train --preset tutorial --data mnist5k): first iteration (compilation, capture) + 28,080 x "
            "steady ms/iteration + 60 x median epoch end" + ("" if end_s is not None else " (no epoch end in the run)")
        )
    wall = rep.get("wall_s")
    rep["full_run_min"] = wall / 60.0 if wall and rep["iterations_done"] >= SEED_ITERATIONS else None
    if rep["full_run_min"] is not None:
        rep["full_run_note"] = (
            "28,080 iterations on the 4,500-image subset: 802 epoch ends (the seed's run has 60); "
            "process start included"
        )
    rand_out = dict(metrics.get("rand_out", []))  # iteration -> rand_out at that epoch end
    at = {}
    for epoch in (0, 5, 20, 59):
        want = 468 * (epoch + 1)
        later = sorted(it for it in rand_out if it >= want)
        if later:
            at[str(epoch)] = {"iteration": later[0], "rand_out": rand_out[later[0]]}
    rep["rand_out_at_seed_epochs"] = at
    try:
        with open(os.path.join(outdir, "evaluate", "report.json")) as fh:
            ev = json.load(fh)
        q = ev.get("quality", {})
        rep["evaluate"] = {
            "fd_generated_vs_real": q.get("fd_generated_vs_real"),
            "fd_real_vs_real": q.get("fd_real_vs_real"),
            "fd_noise_vs_real": q.get("fd_noise_vs_real"),
            "ood": ev.get("ood"),
        }
    except (OSError, ValueError, AttributeError):
        pass
    return rep


def training_report(doc: dict | None, run: dict | None) -> list[str]:
    """The training targets from ``bench.json`` (iteration vs chain time) and the training stage (the seed's length:
    the whole run when it finished, else the projection from its measured rate, marked projected)."""
    rows = [r for r in (doc or {}).get("train", []) if r.get("iter_over_chain") and r.get("batch") == 128]
    by_name = {r["backend"]: r for r in rows}
    row = by_name.get("cdgraph") or min(rows, key=lambda r: r["median_s"], default=None)
    cuda = _is_cuda(doc) or bool((run or {}).get("cuda"))
    ok = None if row is None or not cuda else row["iter_over_chain"] <= 1.15
    lines = [
        f"[{_verdict(ok)}] {TRAINING_TARGETS[0]}: "
        + (
            "n/a"
            if row is None
            else f"{row['iter_over_chain']:.2f}x ({row['backend']}: iteration {1e3 * row['median_s']:.2f} ms, chain "
            f"{1e3 * row['chain_median_s']:.2f} ms)" + ("" if cuda else " [not CUDA: not judged]")
        )
    ]
    full = (run or {}).get("full_run_min")
    minutes = full if full is not None else (run or {}).get("measured_60_epochs_min")
    ok = None if minutes is None or not cuda else minutes <= 3.0
    if full is not None:
        text = f"{full:.2f} min: the whole 28,080-iteration run, measured end to end"
    elif minutes is not None:
        text = f"{minutes:.2f} min PROJECTED from the measured rate of a real run of {run['iterations_done']} it"
    else:
        text = "n/a"
    if minutes is None:
        bench = [r for r in (doc or {}).get("train", []) if r.get("projected_60_epochs_min")]
        best = min(bench, key=lambda r: r["projected_60_epochs_min"], default=None)
        if best is not None:
            text += f" (benchmark projection {best['projected_60_epochs_min']:.2f} min, {best['backend']})"
    lines.append(f"[{_verdict(ok)}] {TRAINING_TARGETS[1]}: {text}" + ("" if cuda or minutes is None else " [not CUDA]"))
    return lines


def _train_run_lines(run: dict | None) -> list[str]:
    if not run:
        return []
    backend = f", sampler backend {run['backend']}" if run.get("backend") else ""
    out = ["", f"training run (ebmfast train --preset tutorial --data mnist5k{backend}, then ebmfast evaluate):"]
    if run.get("skip"):
        return out + [f"  skipped: {run['skip']}"]
    t = run.get("trainer_timing", {})
    out.append(
        f"  {run.get('status', '?')}: {run.get('iterations_done')} of {fmt(run.get('iterations_asked'), '.0f')} "
        f"iterations asked, {fmt(run.get('wall_s'), '.0f')} s end to end (rc {fmt(run.get('rc'), '.0f')}); first "
        f"iteration {fmt(t.get('first_iteration_s'), '.1f')} s, then {fmt(t.get('iteration_ms'), '.2f')} ms/iteration, "
        f"epoch end {fmt(t.get('epoch_end_s'), '.3f')} s"
    )
    if run.get("full_run_min") is not None:
        out.append(f"  the seed's whole length (28,080 iterations) ran: {run['full_run_min']:.2f} min end to end")
    else:
        out.append(
            "  the seed's whole length (28,080 iterations) did not fit the call: PROJECTED from the measured rate"
        )
    out.append(
        f"  measured_60_epochs_min {fmt(run.get('measured_60_epochs_min'), '.2f')} (PROJECTED: first iteration + "
        "28,080 x the run's steady time per iteration + 60 epoch ends)"
    )
    at = run.get("rand_out_at_seed_epochs") or {}
    if at:
        out.append(
            "  rand_out at the seed's epoch ends (seed: -1.1 / -4.3 / -10.2 / -16.3 after epochs 0 / 5 / 20 / 59): "
            + ", ".join(f"epoch {e}: {v['rand_out']:.2f}" for e, v in at.items())
        )
    ev = run.get("evaluate")
    if run.get("evaluate_skip"):
        out.append(f"  evaluate skipped: {run['evaluate_skip']}")
    if ev:
        out.append(
            f"  evaluate: FD generated vs real {fmt(ev.get('fd_generated_vs_real'), '.2f')}, real vs real "
            f"{fmt(ev.get('fd_real_vs_real'), '.2f')}, noise vs real {fmt(ev.get('fd_noise_vs_real'), '.2f')} "
            f"(evaluate rc {fmt(run.get('evaluate_rc'), '.0f')}, {fmt(run.get('evaluate_s'), '.0f')} s)"
        )
    return out


def _junit_counts(path: str) -> str | None:
    import xml.etree.ElementTree as ET

    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    tot = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    passed = tot["tests"] - tot["failures"] - tot["errors"] - tot["skipped"]
    text = f"{passed} passed, {tot['failures']} failed, {tot['errors']} errors, {tot['skipped']} skipped"
    bad = [
        f"{c.get('classname', '').rsplit('.', 1)[-1]}::{c.get('name')}"
        for c in root.iter("testcase")
        if c.find("failure") is not None or c.find("error") is not None
    ]
    if bad:
        text += "; failing: " + ", ".join(bad[:6]) + (f" (+{len(bad) - 6} more)" if len(bad) > 6 else "")
    return text


def _junit_reports(path: str, tag: str = "PRECISION") -> list[str]:
    """Lines starting with ``tag`` that tests printed (kept in the JUnit XML by ``-o junit_logging=system-out``)."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return []
    return [
        ln.strip()
        for out in root.iter("system-out")
        for ln in (out.text or "").splitlines()
        if ln.strip().startswith(tag)
    ]


TEST_STAGES = (  # the pytest stages of bench/device_check.sh: (stage, what it runs)
    ("cuda_tests", "-m '(cuda or device) and not slow'"),
    ("precision_tests", "the reduced-precision kernel tests"),
    ("kernel_sweep", "-m '(cuda or device) and slow' (the kernel sweeps)"),
)


def summarize_device_check(outdir: str) -> str:
    """The short table ``bench/device_check.sh`` prints last: stages, environment, GPU tests, sampler and training
    figures, parity, profile, training run, and the targets (see the module docstring)."""
    out = []
    stages_path = os.path.join(outdir, "stages.tsv")
    stages = []
    if os.path.exists(stages_path):
        with open(stages_path) as fh:
            for line in fh:
                parts = line.rstrip("\n").split("\t")
                if len(parts) == 3:
                    stages.append(parts)
    doc = None
    try:
        with open(os.path.join(outdir, "bench.json")) as fh:
            doc = json.load(fh)
    except (OSError, ValueError):
        pass
    env = (doc or {}).get("environment", {})
    out.append("== ebmfast device check ==")
    if doc is not None and doc.get("complete") is False:
        out.append("NOTE: bench.json is partial (the run stopped during the training measurement)")
    if env:
        out.append(
            f"{env.get('time')}  {env.get('device_name')}  driver {env.get('driver')}  torch {env.get('torch')}"
            f"  triton {env.get('triton')}  cuda {env.get('cuda')}  ebmfast {env.get('ebmfast')}"
        )
    stage_txt = []
    for name, rc, secs in stages:
        status = {"0": "ok", "skipped": "skipped", "124": "TIMEOUT", "137": "KILLED"}.get(rc, f"FAILED rc={rc}")
        stage_txt.append(f"{name} {status} {secs}s")
    out.append("stages: " + (" | ".join(stage_txt) if stage_txt else "none recorded"))
    for name, what in TEST_STAGES:
        xml = os.path.join(outdir, f"{name}.xml")
        if name != "cuda_tests" and not os.path.exists(xml):
            continue
        out.append(f"GPU tests, {what}: {_junit_counts(xml) or 'no result'}")
        out.extend("  " + ln for ln in _junit_reports(xml))
    pb_path = os.path.join(outdir, "pytest_benchmark.json")
    if os.path.exists(pb_path):
        try:
            with open(pb_path) as fh:
                pb = json.load(fh)
            items = []
            for b in pb.get("benchmarks", []):
                info = b.get("extra_info", {})
                if info.get("ratio_to_eager") is not None and info.get("backend") != "eager":
                    items.append(
                        f"{info['backend']} b{info['batch']}"
                        + (f"k{info['steps']}" if "steps" in info else "")
                        + f" {info['ratio_to_eager']:.1f}x"
                    )
            out.append(
                f"pytest-benchmark: {len(pb.get('benchmarks', []))} benchmarks; ratios to eager: "
                + (", ".join(items) or "n/a")
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            out.append(f"pytest-benchmark: unreadable ({type(exc).__name__})")
    parity = parity_report(outdir)
    if parity:
        out.append("parity (the seed CNN's 60-step chains vs the reference, CUDA): " + ", ".join(
            f"{b} {v}" for b, v in parity.items()))  # fmt: skip
    choice = _read_lines(os.path.join(outdir, "train_backend.txt"))
    if choice:
        out.append(f"call 2 trains on: {' - '.join(choice)}")
    call = _read_tsv(os.path.join(outdir, "check_info.tsv")).get("call", "1")
    if doc is None:
        if call != "2":
            out.append("bench.json: missing (see bench_cli.log)")
        run = train_run_report(outdir)
        out.extend(_train_run_lines(run))
        training = training_report(None, run) if run else []
        if run:
            out.append("targets (training; measured, not asserted):")
            out.extend("  " + line for line in training)
        _write_json(os.path.join(outdir, "summary.json"), {"train_run": run, "parity": parity,
                                                           "targets_training": training})  # fmt: skip
        return "\n".join(out)
    peak = doc.get("matmul_peak") or {}
    if peak:
        out.append(
            f"matmul peak (n={peak.get('n')}): fp32 {fmt(peak.get('fp32_tflops'), '.2f')} TFLOP/s, "
            f"tf32 {fmt(peak.get('tf32_tflops'), '.2f')} TFLOP/s; work per sample-step "
            f"{doc.get('flop_per_sample_step', 0) / 1e6:.3f} MFLOP"
        )
    out.append("")
    out.append(
        f"{'backend':<11}{'batch':>6}{'steps':>6}{'sample-steps/s':>15}{'x eager':>9}{'ms/chain':>10}"
        f"{'TFLOP/s':>9}{'%fp32':>7}{'%tf32':>7}{'peak MB':>9}{'first s':>9}"
    )
    for r in doc.get("sampler", []):
        if r.get("skipped") or not r.get("median_s"):
            out.append(f"{r['backend']:<11}{r['batch']:>6}{r['steps']:>6}  skipped: {r.get('skipped')}")
            continue
        pct = lambda v: None if v is None else 100 * v
        out.append(
            f"{r['backend']:<11}{r['batch']:>6}{r['steps']:>6}{r['sample_steps_per_s']:>15,.0f}"
            f"{fmt(r.get('ratio_to_eager'), '.2f'):>9}{r['ms_per_chain']:>10.2f}{fmt(r.get('tflops'), '.3f'):>9}"
            f"{fmt(pct(r.get('frac_fp32_peak')), '.1f'):>7}{fmt(pct(r.get('frac_tf32_peak')), '.1f'):>7}"
            f"{fmt(r.get('peak_mem_mb'), '.1f'):>9}{fmt(r.get('first_call_s'), '.2f'):>9}"
        )
    train = doc.get("train", [])
    if train:
        out.append("")
        out.append(
            f"{'train':<11}{'batch':>6}{'steps':>6}{'CD it/s':>10}{'x eager':>9}{'ms/it':>8}{'chain ms':>9}"
            f"{'it/chain':>9}{'60 ep min':>11}{'first s':>9}"
        )
        for r in train:
            if not r.get("median_s"):
                continue
            chain = r.get("chain_median_s")
            out.append(
                f"{r['backend']:<11}{r['batch']:>6}{r['steps']:>6}{r['iters_per_s']:>10.2f}"
                f"{fmt(r.get('ratio_to_eager'), '.2f'):>9}{1e3 * r['median_s']:>8.2f}"
                f"{fmt(None if chain is None else 1e3 * chain, '.2f'):>9}{fmt(r.get('iter_over_chain'), '.2f'):>9}"
                f"{r['projected_60_epochs_min']:>11.2f}{fmt(r.get('first_iter_s'), '.2f'):>9}"
            )
    tel = next((r.get("telemetry") for r in doc.get("sampler", []) if r.get("telemetry")), None)
    if tel and tel.get("available"):
        clk, pw, tc = tel.get("sm_clock_mhz") or {}, tel.get("power_w") or {}, tel.get("temperature_c") or {}
        out.append(
            f"telemetry (first cell): SM clock median {fmt(clk.get('median'), '.0f')} MHz, power max "
            f"{fmt(pw.get('max'), '.0f')} W, temperature max {fmt(tc.get('max'), '.0f')} C"
        )
    elif tel:
        out.append(f"telemetry: unavailable ({tel.get('reason')})")
    out.extend(_profile_lines(os.path.join(outdir, "profile.json")))
    run = train_run_report(outdir)
    out.extend(_train_run_lines(run))
    out.append("")
    out.append("targets (sampler speed and memory; measured, not asserted):")
    sampler = sampler_target_report(doc)
    out.extend("  " + line for line in sampler)
    cold = _read_tsv(os.path.join(outdir, "check_info.tsv")).get("compile_cache", "").startswith("cold")
    triton_lines, persistent_lines = kernel_backend_report(doc, _profile_doc(outdir), cold_cache=cold)
    out.append("targets (backend triton; measured, not asserted):")
    out.extend("  " + line for line in triton_lines)
    out.append("targets (backend persistent; measured, not asserted):")
    out.extend("  " + line for line in persistent_lines)
    out.append("targets (training; measured, not asserted):")
    training = training_report(doc, run)
    out.extend("  " + line for line in training)
    rows = backend_rows(doc)
    if rows:
        _write_json(os.path.join(outdir, "backend_rows.json"), {"rows": rows})
        out.append(
            f"backend_rows.json: {len(rows)} row(s) for backend='auto' "
            f"(python3 bench/device_summary.py --merge-table {outdir})"
        )
    _write_json(
        os.path.join(outdir, "summary.json"),
        {
            "train_run": run,
            "parity": parity,
            "targets_sampler": sampler,
            "targets_triton": triton_lines,
            "targets_persistent": persistent_lines,
            "targets_training": training,
        },
    )
    return "\n".join(out)


def _write_json(path: str, doc: dict) -> None:
    try:
        with open(path, "w") as fh:
            json.dump(doc, fh, indent=2)
    except OSError:
        pass


def _profile_lines(path: str) -> list[str]:
    """A few lines from bench/profile_step.py's JSON: chain variants and kernels per step (empty when absent)."""
    try:
        with open(path) as fh:
            prof = json.load(fh)
    except (OSError, ValueError):
        return []
    out = ["", "profile (bench/profile_step.py; median per chain):"]
    for r in prof.get("chain_variants") or prof.get("graph_variants") or []:
        variant = " ".join(f"{k} {str(r[k]):<5}" for k in ("channels_last", "cudnn_benchmark") if k in r)
        head = f"  {r.get('backend', 'graph'):<10} batch {r['batch']:>6} steps {r['steps']} {variant} {r['precision']}"
        if not r.get("sample_steps_per_s"):
            why = r.get("error") or f"skipped: {r.get('skipped')}"
            out.append(f"{head}: {why[:120]}")
            continue
        out.append(f"{head}: {r['us_per_step']:8.1f} us/step, {r['sample_steps_per_s']:>13,.0f} sample-steps/s")
    for p in prof.get("profiles", []):
        top = p.get("top") or [{}]
        layout = " channels_last" if p.get("channels_last") else ""
        out.append(
            f"  {p['backend']}{layout} batch {p['batch']}: {p.get('kernels', '?')} kernels per chain "
            f"({p['kernels_per_step']:.2f}/step), GPU busy {p['busy_us_per_step']:.1f} of "
            f"{p['chain_us_per_step']:.1f} us/step; top kernel {top[0].get('name', '?')[:50]} "
            f"{top[0].get('us_per_step', 0):.1f} us/step"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 2 and argv[0] == "--choose-train-backend":
        backend, why = choose_train_backend(argv[1])
        print(backend)  # the shell reads this line
        print(why)
        return 0
    if len(argv) in (2, 3) and argv[0] == "--merge-table":
        try:
            with open(os.path.join(argv[1], "bench.json")) as fh:
                rows = backend_rows(json.load(fh))
        except (OSError, ValueError) as exc:
            print(f"--merge-table: cannot read {argv[1]}/bench.json: {exc}", file=sys.stderr)
            return 2
        if not rows:
            print(f"--merge-table: {argv[1]}/bench.json has no CUDA rows with graph measured", file=sys.stderr)
            return 2
        table_path = argv[2] if len(argv) == 3 else AUTO_TABLE
        table = merge_table(table_path, rows)
        with open(table_path, "w") as fh:
            json.dump(table, fh, indent=2)
            fh.write("\n")
        print(f"{table_path}: {len(rows)} row(s) merged, {len(table['rows'])} in all")
        return 0
    if len(argv) != 1:
        print(
            "usage: python3 bench/device_summary.py OUTDIR | --choose-train-backend OUTDIR"
            " | --merge-table OUTDIR [TABLE]",
            file=sys.stderr,
        )
        return 2
    print(summarize_device_check(argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
