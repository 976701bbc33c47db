"""The GPU check's summary (``bench/device_check.sh`` prints it last) and its verdicts on the project's targets.

    python3 bench/device_summary.py OUTDIR

reads OUTDIR/{stages.tsv, bench.json, pytest_benchmark.json, cuda_tests.xml, profile.json} and prints the stages,
the environment, the GPU tests' counts and printed PRECISION lines, the sampler and training figures, the profile,
and issue 4's targets judged from ``bench.json`` (met / NOT met / not measured). Measurements are reported, never
asserted: this script judges them, the library (``ebmfast.benchmark``) only measures. It needs only the Python
standard library, so the summary is written even when the package does not import.
"""

from __future__ import annotations

import json
import os
import sys


def fmt(v, spec: str, none: str = "n/a") -> str:
    return none if v is None else format(v, spec)


GPU_TARGETS = (
    "batch 128, 60 steps: graph >= 20x eager sample-steps/s (same run)",
    "batch 16384: >= 40% of measured fp32 matmul peak in achieved FLOP/s (TF32 reported separately)",
    "seed's 60-epoch MNIST training (batch 128, 60 steps) projected <= 3 minutes",
    "graph peak memory <= 2x eager at batch 128 (60 steps)",
)
CPU_TARGET = "CPU, batch 128, 60 steps: best backend >= 1.5x eager sample-steps/s (aim 2x)"


def _verdict(ok: bool | None) -> str:
    return "not measured" if ok is None else ("met" if ok else "NOT met")


def target_report(doc: dict) -> list[str]:
    """Issue 4's targets judged from an ``ebmfast bench --json`` document: the GPU targets for a CUDA run, the
    CPU target for a CPU run. Reported, never asserted."""
    rows = [r for r in doc.get("sampler", []) if r.get("median_s")]
    cell = {(r["backend"], r["batch"], r["steps"]): r for r in rows}
    device = str(doc.get("environment", {}).get("device", ""))
    if not device.startswith("cuda"):
        e = cell.get(("eager", 128, 60))
        others = [r for (b, n, k), r in cell.items() if n == 128 and k == 60 and b != "eager"]
        best = max(others, key=lambda r: r["ratio_to_eager"] or 0.0, default=None)
        ok = None if (e is None or best is None) else best["ratio_to_eager"] >= 1.5
        return [
            f"[{_verdict(ok)}] {CPU_TARGET}: "
            + ("n/a" if ok is None else f"{best['ratio_to_eager']:.2f}x ({best['backend']})")
        ]
    lines = []
    g, e = cell.get(("graph", 128, 60)), cell.get(("eager", 128, 60))
    ratio = g["ratio_to_eager"] if g and e else None
    lines.append(
        f"[{_verdict(None if ratio is None else ratio >= 20)}] {GPU_TARGETS[0]}: "
        + ("n/a" if ratio is None else f"{ratio:.1f}x")
    )
    big = [r for r in rows if r["batch"] == 16384 and r.get("frac_fp32_peak") is not None]
    best = max(big, key=lambda r: r["frac_fp32_peak"], default=None)
    lines.append(
        f"[{_verdict(None if best is None else best['frac_fp32_peak'] >= 0.4)}] {GPU_TARGETS[1]}: "
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
        f"[{_verdict(None if bt is None else bt['projected_60_epochs_min'] <= 3.0)}] {GPU_TARGETS[2]}: "
        + ("n/a" if bt is None else f"{bt['projected_60_epochs_min']:.2f} min ({bt['backend']})")
    )
    gm, em = (g or {}).get("peak_mem_mb"), (e or {}).get("peak_mem_mb")
    mem_ok = None if (gm is None or not em) else gm <= 2 * em
    lines.append(
        f"[{_verdict(mem_ok)}] {GPU_TARGETS[3]}: "
        + ("n/a" if mem_ok is None else f"graph {gm:.1f} MB vs eager {em:.1f} MB ({gm / em:.2f}x)")
    )
    return lines


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


def summarize_device_check(outdir: str) -> str:
    """The short table ``bench/device_check.sh`` prints last: stages, environment, sampler and training figures,
    the issue-4 targets. Reads OUTDIR/{stages.tsv, bench.json, pytest_benchmark.json, cuda_tests.xml}."""
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
    counts = _junit_counts(os.path.join(outdir, "cuda_tests.xml"))
    out.append(f"GPU tests (-m 'cuda or device'): {counts or 'no result'}")
    out.extend("  " + ln for ln in _junit_reports(os.path.join(outdir, "cuda_tests.xml")))
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
    if doc is None:
        out.append("bench.json: missing (see bench_cli.log)")
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
        f"{'backend':<9}{'batch':>6}{'steps':>6}{'sample-steps/s':>15}{'x eager':>9}{'ms/chain':>10}"
        f"{'TFLOP/s':>9}{'%fp32':>7}{'%tf32':>7}{'peak MB':>9}{'first s':>9}"
    )
    for r in doc.get("sampler", []):
        if r.get("skipped") or not r.get("median_s"):
            out.append(f"{r['backend']:<9}{r['batch']:>6}{r['steps']:>6}  skipped: {r.get('skipped')}")
            continue
        pct = lambda v: None if v is None else 100 * v
        out.append(
            f"{r['backend']:<9}{r['batch']:>6}{r['steps']:>6}{r['sample_steps_per_s']:>15,.0f}"
            f"{fmt(r.get('ratio_to_eager'), '.2f'):>9}{r['ms_per_chain']:>10.2f}{fmt(r.get('tflops'), '.3f'):>9}"
            f"{fmt(pct(r.get('frac_fp32_peak')), '.1f'):>7}{fmt(pct(r.get('frac_tf32_peak')), '.1f'):>7}"
            f"{fmt(r.get('peak_mem_mb'), '.1f'):>9}{fmt(r.get('first_call_s'), '.2f'):>9}"
        )
    train = doc.get("train", [])
    if train:
        out.append("")
        out.append(f"{'train':<9}{'batch':>6}{'steps':>6}{'CD it/s':>10}{'x eager':>9}{'60 ep min':>11}{'first s':>9}")
        for r in train:
            if not r.get("median_s"):
                continue
            out.append(
                f"{r['backend']:<9}{r['batch']:>6}{r['steps']:>6}{r['iters_per_s']:>10.2f}"
                f"{fmt(r.get('ratio_to_eager'), '.2f'):>9}{r['projected_60_epochs_min']:>11.2f}"
                f"{fmt(r.get('first_iter_s'), '.2f'):>9}"
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
    out.append("")
    out.append("targets (issue 4; measured, not asserted):")
    out.extend("  " + line for line in target_report(doc))
    return "\n".join(out)


def _profile_lines(path: str) -> list[str]:
    """A few lines from bench/profile_step.py's JSON: graph variants and kernels per step (empty when absent)."""
    try:
        with open(path) as fh:
            prof = json.load(fh)
    except (OSError, ValueError):
        return []
    out = ["", "profile (bench/profile_step.py; graph backend, median per chain):"]
    for r in prof.get("graph_variants", []):
        variant = " ".join(f"{k} {str(r[k]):<5}" for k in ("channels_last", "cudnn_benchmark") if k in r)
        out.append(
            f"  batch {r['batch']:>6} steps {r['steps']} {variant} "
            f"{r['precision']}: {r['us_per_step']:8.1f} us/step, {r['sample_steps_per_s']:>13,.0f} sample-steps/s"
        )
    for p in prof.get("profiles", []):
        top = p.get("top") or [{}]
        layout = " channels_last" if p.get("channels_last") else ""
        out.append(
            f"  {p['backend']}{layout} batch {p['batch']}: {p['kernels_per_step']:.1f} kernels/step, GPU busy "
            f"{p['busy_us_per_step']:.1f} of {p['chain_us_per_step']:.1f} us/step; top kernel "
            f"{top[0].get('name', '?')[:50]} {top[0].get('us_per_step', 0):.1f} us/step"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python3 bench/device_summary.py OUTDIR", file=sys.stderr)
        return 2
    print(summarize_device_check(argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
