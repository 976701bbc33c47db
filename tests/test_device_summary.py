"""The GPU check's summary script (``bench/device_summary.py``): target verdicts and the summary table, from
documents shaped like ``ebmfast bench --json`` output, JUnit XML and the profile JSON."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("device_summary", ROOT / "bench" / "device_summary.py")
device_summary = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(device_summary)


def _row(backend, batch, steps, ssps, ratio, mem=None, frac=None):
    return {
        "backend": backend,
        "batch": batch,
        "steps": steps,
        "median_s": batch * steps / ssps,
        "sample_steps_per_s": ssps,
        "ratio_to_eager": ratio,
        "ms_per_chain": 1e3 * batch * steps / ssps,
        "tflops": None if frac is None else frac * 50,
        "frac_fp32_peak": frac,
        "frac_tf32_peak": None if frac is None else frac / 8,
        "peak_mem_mb": mem,
        "first_call_s": 1.0,
        "skipped": None,
        "telemetry": None,
    }


def _gpu_doc(graph_ratio=25.0, frac=0.45, minutes=2.5, graph_mem=30.0):
    return {
        "environment": {"device": "cuda", "device_name": "Fake H200", "time": "t", "torch": "2.11", "triton": "3.6"},
        "matmul_peak": {"n": 8192, "fp32_tflops": 50.0, "tf32_tflops": 400.0},
        "flop_per_sample_step": 3424512,
        "sampler": [
            _row("eager", 128, 60, 1e5, 1.0, mem=20.0),
            _row("graph", 128, 60, 1e5 * graph_ratio, graph_ratio, mem=graph_mem),
            _row("eager", 16384, 60, 1e6, 1.0, frac=0.1),
            _row("graph", 16384, 60, 4e6, 4.0, frac=frac),
        ],
        "train": [
            {
                "backend": "graph",
                "batch": 128,
                "steps": 60,
                "median_s": minutes * 60 / (60 * 468),
                "iters_per_s": 1.0,
                "ratio_to_eager": 3.0,
                "projected_60_epochs_min": minutes,
                "first_iter_s": 2.0,
            }
        ],
    }


def test_target_report_gpu_verdicts():
    met = device_summary.target_report(_gpu_doc())
    assert [line.split("]")[0] for line in met] == ["[met"] * 4
    assert "25.0x" in met[0] and "45.0% fp32" in met[1] and "2.50 min (graph)" in met[2] and "1.50x" in met[3]
    missed = device_summary.target_report(_gpu_doc(graph_ratio=19.9, frac=0.39, minutes=3.1, graph_mem=41.0))
    assert [line.split("]")[0] for line in missed] == ["[NOT met"] * 4
    doc = _gpu_doc()
    doc["sampler"] = doc["sampler"][:1]
    doc["train"] = []
    assert [line.split("]")[0] for line in device_summary.target_report(doc)] == ["[not measured"] * 4


def test_target_report_cpu():
    doc = {
        "environment": {"device": "cpu"},
        "sampler": [
            _row("eager", 128, 60, 1e4, 1.0),
            _row("compiled", 128, 60, 1.6e4, 1.6),
            _row("fused", 128, 60, 1.2e4, 1.2),
        ],
    }
    (line,) = device_summary.target_report(doc)
    assert line.startswith("[met]") and "1.60x (compiled)" in line


def test_summarize_device_check(tmp_path):
    (tmp_path / "bench.json").write_text(json.dumps(_gpu_doc()))
    (tmp_path / "stages.tsv").write_text(
        "env\t0\t2\ncuda_tests\t1\t80\nbench_cli\t124\t200\npytest_bench\tskipped\t0\n"
    )
    (tmp_path / "cuda_tests.xml").write_text(
        '<testsuites><testsuite tests="10" failures="1" errors="0" skipped="2">'
        '<testcase classname="tests.test_graph_cuda" name="test_replay"><failure message="x"/></testcase>'
        '<testcase classname="tests.test_graph_cuda" name="test_ok"/></testsuite></testsuites>'
    )
    text = device_summary.summarize_device_check(str(tmp_path))
    assert "env ok 2s | cuda_tests FAILED rc=1 80s | bench_cli TIMEOUT 200s | pytest_bench skipped 0s" in text
    assert "7 passed, 1 failed, 0 errors, 2 skipped; failing: test_graph_cuda::test_replay" in text
    assert text.rstrip().splitlines()[-4].startswith("  [met]")
    assert "Fake H200" in text and "2,500,000" in text
    empty = device_summary.summarize_device_check(str(tmp_path / "nothing"))
    assert "bench.json: missing" in empty and "none recorded" in empty


def test_device_check_summary_includes_the_profile(tmp_path):
    (tmp_path / "profile.json").write_text(
        json.dumps(
            {
                "graph_variants": [
                    dict(
                        batch=128,
                        steps=60,
                        channels_last=True,
                        precision="tf32",
                        us_per_step=123.4,
                        sample_steps_per_s=1.0e6,
                    )
                ],
                "profiles": [
                    dict(
                        backend="graph",
                        batch=128,
                        channels_last=True,
                        kernels_per_step=25.5,
                        busy_us_per_step=90.0,
                        chain_us_per_step=400.0,
                        top=[dict(name="cudnn_kernel", us_per_step=12.5)],
                    )
                ],
            }
        )
    )
    lines = device_summary._profile_lines(str(tmp_path / "profile.json"))
    assert any("channels_last True  tf32:    123.4 us/step" in ln for ln in lines), lines
    assert any(
        "graph channels_last batch 128: 25.5 kernels/step, GPU busy 90.0 of 400.0 us/step" in ln for ln in lines
    ), lines
    assert device_summary._profile_lines(str(tmp_path / "missing.json")) == []


def test_device_check_summary_quotes_printed_precision_lines(tmp_path):
    (tmp_path / "cuda_tests.xml").write_text(
        '<testsuites><testsuite tests="1" failures="0" errors="0" skipped="0"><testcase classname="t" name="p">'
        "<system-out>\nPRECISION tf32: mean abs deviation from fp32 1.000e-04, max 2.000e-03\nother</system-out>"
        "</testcase></testsuite></testsuites>"
    )
    text = device_summary.summarize_device_check(str(tmp_path))
    assert "  PRECISION tf32: mean abs deviation from fp32 1.000e-04, max 2.000e-03" in text
    assert "other" not in text
