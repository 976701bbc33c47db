"""The GPU check's summary script (``bench/device_summary.py``): target verdicts and the summary table, from
documents shaped like ``ebmfast bench --json`` output, JUnit XML and the profile JSON."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

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


def test_sampler_targets_gpu_verdicts():
    met = device_summary.sampler_target_report(_gpu_doc())
    assert [line.split("]")[0] for line in met] == ["[met"] * 4
    assert "25.0x" in met[0] and "45.0% fp32" in met[1] and "2.50 min (graph)" in met[2] and "1.50x" in met[3]
    missed = device_summary.sampler_target_report(_gpu_doc(graph_ratio=19.9, frac=0.39, minutes=3.1, graph_mem=41.0))
    assert [line.split("]")[0] for line in missed] == ["[NOT met"] * 4
    doc = _gpu_doc()
    doc["sampler"] = doc["sampler"][:1]
    doc["train"] = []
    assert [line.split("]")[0] for line in device_summary.sampler_target_report(doc)] == ["[not measured"] * 4


def test_sampler_target_cpu():
    doc = {
        "environment": {"device": "cpu"},
        "sampler": [
            _row("eager", 128, 60, 1e4, 1.0),
            _row("compiled", 128, 60, 1.6e4, 1.6),
            _row("fused", 128, 60, 1.2e4, 1.2),
        ],
    }
    (line,) = device_summary.sampler_target_report(doc)
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
    lines = text.rstrip().splitlines()
    at = lines.index("targets (sampler speed and memory; measured, not asserted):")
    assert lines[at + 1].startswith("  [met]"), lines[at:]
    assert "targets (training; measured, not asserted):" in lines[at:]
    assert json.loads((tmp_path / "summary.json").read_text())["targets_sampler"][0].startswith("[met]")
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
        "graph channels_last batch 128: ? kernels per chain (25.50/step), GPU busy 90.0 of 400.0 us/step" in ln
        for ln in lines
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


# ------------------------------------------------------------------------------------------------ the training run
def _train_rows(cdgraph_ms=15.0, chain_ms=14.0):
    def row(name, ms, chain):
        return {
            "backend": name,
            "batch": 128,
            "steps": 60,
            "median_s": ms / 1e3,
            "iters_per_s": 1e3 / ms,
            "ratio_to_eager": 5.0,
            "projected_60_epochs_min": 28080 * ms / 1e3 / 60,
            "first_iter_s": 2.0,
            "chain_median_s": chain / 1e3,
            "iter_over_chain": ms / chain,
        }

    return [row("graph", 18.8, 13.9), row("cdgraph", cdgraph_ms, chain_ms)]


def _write_run(tmp_path, iterations=2100, first=20.0, it_ms=5.0, end_s=0.1, wall=60.0):
    (tmp_path / "train_run.tsv").write_text(
        f"status\tcompleted (max_iterations)\nrc\t0\niterations_asked\t{iterations}\nwall_s\t{wall}\n"
        "command\tpython3 -m ebmfast train ...\nevaluate_rc\t0\nevaluate_s\t30\n"
    )
    run = tmp_path / "train_run"
    run.mkdir()
    rows = ["step,epoch,metric,value,wall_time"]
    rows += [f"{i},{(i - 1) // 35},loss,0.1,0" for i in range(1, iterations + 1)]
    rows += [f"{35 * (e + 1)},{e},rand_out,{-0.1 * e},0" for e in range(iterations // 35)]
    rows.append(f"{iterations},{iterations // 35},rand_out,-20.0,0")  # the stop's report at max_iterations
    rows += [f"{iterations},0,time/{k},{v},0" for k, v in (("first_iteration_s", first), ("iteration_ms", it_ms))]
    rows.append(f"{iterations},0,time/epoch_end_s,{end_s},0")
    (run / "metrics.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "evaluate").mkdir()
    (tmp_path / "evaluate" / "report.json").write_text(
        json.dumps({"quality": {"fd_generated_vs_real": 30.0, "fd_real_vs_real": 3.0, "fd_noise_vs_real": 900.0}})
    )


def test_train_run_report_and_training_verdicts(tmp_path):
    _write_run(tmp_path)
    run = device_summary.train_run_report(str(tmp_path))
    assert run["iterations_done"] == 2100 and run["wall_s"] == 60.0 and run["full_run_min"] is None
    want = (20.0 + 28080 * 5.0 / 1e3 + 60 * 0.1) / 60
    assert run["measured_60_epochs_min"] == pytest.approx(want) and "projected" in run["measured_60_epochs_basis"]
    assert run["rand_out_at_seed_epochs"]["0"]["iteration"] == 490  # the first epoch end at or after 468
    assert run["rand_out_at_seed_epochs"]["0"]["rand_out"] == pytest.approx(-1.3)
    assert set(run["rand_out_at_seed_epochs"]) == {"0"}  # later seed epochs are beyond 2,100 iterations
    assert run["evaluate"]["fd_real_vs_real"] == 3.0
    doc = _gpu_doc()
    doc["train"] = _train_rows()
    met = device_summary.training_report(doc, run)
    assert [line.split("]")[0] for line in met] == ["[met", "[met"]
    assert "1.07x (cdgraph: iteration 15.00 ms, chain 14.00 ms)" in met[0] and "2.77 min PROJECTED" in met[1]
    doc["train"] = _train_rows(cdgraph_ms=16.5)
    slow = dict(run, measured_60_epochs_min=3.2)
    assert [line.split("]")[0] for line in device_summary.training_report(doc, slow)] == ["[NOT met", "[NOT met"]
    none = device_summary.training_report({"environment": {"device": "cuda"}, "train": []}, None)
    assert [line.split("]")[0] for line in none] == ["[not measured", "[not measured"]
    cpu = device_summary.training_report({"environment": {"device": "cpu"}, "train": _train_rows()}, run)
    assert [line.split("]")[0] for line in cpu] == ["[not measured", "[not measured"]  # targets are for the H200


def test_full_run_and_skipped_run(tmp_path):
    _write_run(tmp_path, iterations=28080, wall=170.0)
    run = device_summary.train_run_report(str(tmp_path))
    assert run["full_run_min"] == pytest.approx(170 / 60) and "802 epoch ends" in run["full_run_note"]
    assert set(run["rand_out_at_seed_epochs"]) == {"0", "5", "20", "59"}
    (tmp_path / "bench.json").write_text(json.dumps(_gpu_doc()))
    text = device_summary.summarize_device_check(str(tmp_path))
    assert "the seed's whole length (28,080 iterations) ran: 2.83 min" in text
    assert "2.83 min: the whole 28,080-iteration run, measured end to end" in text  # judged on the run, not projected
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["train_run"]["measured_60_epochs_min"] == pytest.approx(run["measured_60_epochs_min"])
    skipped = tmp_path / "skipped"
    skipped.mkdir()
    (skipped / "train_run.tsv").write_text("skip\t20s left for training\n")
    report = device_summary.train_run_report(str(skipped))
    assert report == {"skip": "20s left for training", "cuda": False}  # no env.log: not a CUDA run
    assert "skipped: 20s left" in "\n".join(device_summary._train_run_lines(report))


def _kernel_doc():
    """A CUDA bench document with the kernel backends beside eager and graph, and the model key of the table."""
    doc = _gpu_doc()
    doc["model"] = {"architecture": "CNNModel-abc", "sample_shape": [1, 28, 28], "precision": "fp32"}
    doc["sampler"] += [
        _row("eager", 1, 60, 1e3, 1.0, mem=1.0),
        _row("graph", 1, 60, 2e4, 20.0, mem=1.0),
        _row("persistent", 1, 60, 1.5e5, 150.0),
        _row("triton", 128, 60, 3e6, 30.0, mem=25.0),
        _row("persistent", 128, 60, 4e6, 40.0),
        _row("triton", 16384, 60, 9e6, 9.0, frac=0.5),
        _row("persistent", 16384, 60, 7e6, 7.0, frac=0.3),
    ]
    for r in doc["sampler"]:
        if r["backend"] == "persistent":
            r["first_call_s"] = 12.5 if r["batch"] == 128 else 0.5
    return doc


def _kernel_profile_doc():
    def variant(b, p, ssps):
        return dict(backend=b, batch=16384, steps=60, precision=p, sample_steps_per_s=ssps, us_per_step=16384e6 / ssps)

    busy = dict(busy_us_per_step=20.0, chain_us_per_step=25.0, top=[dict(name="kernel", us_per_step=10.0)])
    return {
        "chain_variants": [
            variant("triton", "fp32", 1e6),
            variant("triton", "tf32", 2.5e6),
            variant("persistent", "fp32", 1e6),
            variant("persistent", "tf32", 3e6),
            dict(backend="persistent", batch=16384, steps=60, precision="bf16", error="RuntimeError: boom"),
        ],
        "profiles": [
            dict(backend="triton", batch=128, steps=60, kernels=540, kernels_per_step=9.0, **busy),
            dict(backend="persistent", batch=128, steps=60, kernels=1, kernels_per_step=1 / 60, **busy),
        ],
    }


def test_kernel_backend_targets_are_judged_from_the_bench_and_the_profile():
    triton_lines, persistent_lines = device_summary.kernel_backend_report(_kernel_doc(), _kernel_profile_doc())
    assert [ln.split("]")[0] + "]" for ln in triton_lines] == ["[met]", "[met]", "[met]", "[met]", "[met]"], (
        triton_lines
    )
    assert "30.0x" in triton_lines[0] and "9.00 kernels/step" in triton_lines[1] and "50.0%" in triton_lines[2]
    assert "tf32 2.50x" in triton_lines[3] and "batch 128: 25.0 vs 30.0 MB" in triton_lines[4]
    # persistent: 40x < 50x at 128; 150x >= 100x at batch 1; 30% < 40%; bf16 failed -> not judged; 1 kernel; 12.5 s;
    # 32 us per step at batch 128
    verdicts = [ln.split("]")[0] + "]" for ln in persistent_lines]
    assert verdicts == ["[NOT met]", "[met]", "[NOT met]", "[not measured]", "[met]", "[met]", "[met]"], (
        persistent_lines
    )
    assert "tf32 3.00x" in persistent_lines[3] and "not every precision measured" in persistent_lines[3]
    assert "1 kernel(s) per 60-step chain" in persistent_lines[4] and "12.5 s (batch 128" in persistent_lines[5]
    assert "32.0 us/step" in persistent_lines[6]  # 128 samples x 60 steps at 4e6 sample-steps/s


def test_kernel_backend_targets_without_measurements_or_off_cuda():
    triton_lines, persistent_lines = device_summary.kernel_backend_report(None, {})
    assert all(ln.startswith("[not measured]") and ln.endswith("n/a") for ln in triton_lines + persistent_lines)
    cpu = _kernel_doc()
    cpu["environment"]["device"] = "cpu"
    triton_lines, _ = device_summary.kernel_backend_report(cpu, {})
    assert triton_lines[0].startswith("[not measured]") and "[not CUDA: not judged]" in triton_lines[0]


def test_backend_rows_and_merging_them_into_the_table(tmp_path):
    rows = device_summary.backend_rows(_kernel_doc())
    assert [r["batch"] for r in rows] == [1, 128, 16384]
    b128 = rows[1]
    assert b128["gpu"] == "Fake H200" and b128["architecture"] == "CNNModel-abc" and b128["sample_shape"] == [1, 28, 28]
    assert set(b128["us_per_step"]) == {"eager", "graph", "triton", "persistent"}
    # 128 samples x 60 steps at 3e6 sample-steps/s = 2.56 ms per chain = 42.667 us per step
    assert b128["us_per_step"]["triton"] == pytest.approx(1e6 * 128 / 3e6, rel=1e-4)
    assert device_summary.backend_rows({**_kernel_doc(), "model": None}) == []
    table = tmp_path / "table.json"
    table.write_text(
        json.dumps({"about": "x", "rows": [dict(rows[1], us_per_step={"graph": 1.0}), dict(rows[0], gpu="B200")]})
    )
    merged = device_summary.merge_table(str(table), rows)
    assert merged["about"] == "x" and len(merged["rows"]) == 4  # the old H200 batch-128 row replaced, B200 kept
    assert [r["us_per_step"] for r in merged["rows"] if r["gpu"] == "Fake H200" and r["batch"] == 128] == [
        b128["us_per_step"]
    ]


def test_summary_writes_backend_rows_and_merge_table_command(tmp_path, capsys):
    (tmp_path / "bench.json").write_text(json.dumps(_kernel_doc()))
    (tmp_path / "profile.json").write_text(json.dumps(_kernel_profile_doc()))
    text = device_summary.summarize_device_check(str(tmp_path))
    assert "targets (backend triton; measured, not asserted):" in text
    assert "targets (backend persistent; measured, not asserted):" in text
    assert "persistent: boom" not in text and "RuntimeError: boom" in text  # the failed variant is shown as such
    assert len(json.loads((tmp_path / "backend_rows.json").read_text())["rows"]) == 3
    assert len(json.loads((tmp_path / "summary.json").read_text())["targets_persistent"]) == 7
    table = tmp_path / "table.json"
    assert device_summary.main(["--merge-table", str(tmp_path), str(table)]) == 0
    assert len(json.loads(table.read_text())["rows"]) == 3
    assert device_summary.main(["--merge-table", str(tmp_path / "none"), str(table)]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_profile_plan_measures_what_the_targets_need_first():
    """bench/profile_step.py's order: the kernel backends' precisions at the largest batch, then their profiles."""
    spec = importlib.util.spec_from_file_location("profile_step", ROOT / "bench" / "profile_step.py")
    profile_step = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(profile_step)
    items = profile_step.plan([128, 16384])
    first = [(i[1], i[4]) for i in items[:6]]
    assert first == [(b, p) for b in ("triton", "persistent") for p in ("fp32", "tf32", "bf16")]
    assert all(i[2] == 16384 for i in items[:6])
    assert items[6:8] == [("profile", "triton", 128, None), ("profile", "persistent", 128, None)]
    assert len(items) == len(set(items))  # nothing measured twice
    variants = {(i[1], i[2], i[3], i[4]) for i in items if i[0] == "variant"}
    assert ("graph", 128, True, "tf32") in variants and ("persistent", 128, None, "bf16") in variants


# ------------------------------------------------------------------------------------------------ parity, call 2
def _parity_xml(tmp_path, persistent_fails=False):
    fail = '<failure message="x"/>' if persistent_fails else ""
    (tmp_path / "parity.xml").write_text(
        "<testsuites><testsuite>"
        '<testcase classname="tests.test_layers" name="test_seed_cnn_60_step_trajectory_parity"/>'
        f'<testcase classname="tests.test_persistent" name="test_60_step_parity_conv_chains[seed-2]">{fail}</testcase>'
        '<testcase classname="tests.test_sampler_kernels" '
        'name="test_kernel_backend_on_the_seed_cnn_with_trajectory_and_supplied_noise[cuda-triton]"/>'
        "</testsuite></testsuites>"
    )


def test_parity_report_and_call_2_backend_choice(tmp_path, capsys):
    assert device_summary.parity_report(str(tmp_path)) == {}
    assert device_summary.choose_train_backend(str(tmp_path))[0] == "graph"  # nothing measured: the default
    _parity_xml(tmp_path)
    assert device_summary.parity_report(str(tmp_path)) == {"triton": "passed", "persistent": "passed"}
    (tmp_path / "bench.json").write_text(json.dumps(_kernel_doc()))  # batch 128: persistent 4e6 > triton 3e6
    backend, why = device_summary.choose_train_backend(str(tmp_path))
    assert backend == "persistent" and "persistent 32.0 us/step" in why and "graph" in why
    _parity_xml(tmp_path, persistent_fails=True)
    assert device_summary.parity_report(str(tmp_path))["persistent"] == "FAILED"
    assert device_summary.choose_train_backend(str(tmp_path))[0] == "triton"  # the fastest that passed
    assert device_summary.main(["--choose-train-backend", str(tmp_path)]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "triton"
    text = device_summary.summarize_device_check(str(tmp_path))
    assert "parity (the seed CNN's 60-step chains vs the reference, CUDA): triton passed, persistent FAILED" in text


def test_call_2_summary_judges_the_training_without_a_benchmark(tmp_path):
    """Call 2 has no bench.json: the training run is judged (CUDA from env.log), a projection marked PROJECTED."""
    _write_run(tmp_path, iterations=2100)
    (tmp_path / "check_info.tsv").write_text("compile_cache\tcold\t/tmp/x\ncall\t2\n")
    (tmp_path / "env.log").write_text("torch 2.11\ncuda available: True\n")
    text = device_summary.summarize_device_check(str(tmp_path))
    assert "bench.json: missing" not in text and "did not fit the call: PROJECTED" in text
    assert "PROJECTED from the measured rate of a real run of 2100 it" in text
    assert "[met] the seed's 60 epochs" in text  # 2.77 min projected <= 3
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["targets_training"][1].startswith("[met]")


@pytest.mark.slow
def test_gpu_test_selection_drops_the_cpu_cases():
    """The GPU check's pytest plugin: no case parametrized for the CPU is selected, the CUDA ones are."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "bench"), str(ROOT)])}
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "gpu_test_selection", "-m", "cuda or device",
         "tests/test_sampler_kernels.py", "tests/test_buffer.py"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    ids = [ln for ln in res.stdout.splitlines() if "::" in ln]
    assert ids and not [i for i in ids if "[cpu" in i or "-cpu" in i], ids
    assert any("[cuda-triton]" in i for i in ids)
