"""The static cost model (``bench/costmodel.py``): SASS parsing, loops, dynamic counts from source line counts, the
occupancy and time arithmetic, on small canned text; one slow test compiles a real launch and reports it."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
_spec = importlib.util.spec_from_file_location("costmodel", ROOT / "bench" / "costmodel.py")
costmodel = importlib.util.module_from_spec(_spec)
sys.modules["costmodel"] = costmodel  # dataclasses look their module up by name
_spec.loader.exec_module(costmodel)

# A kernel source: a loop of 5 trips around a runtime `if`, then a call of a helper with a loop of its own.
SOURCE = """\
def kernel(X, n):
    acc = 0
    for k in range(5):
        a = load(X + k)
        if k < 3:
            acc = fma(acc, a)
    helper(acc)


def helper(v):
    for j in range(4):
        v = v * 2
"""

SASS = """\
\t.headerflags\t@"EF_CUDA_SM90"
//--------------------- .text.kernel  --------------------------
\t.section\t.text.kernel,"ax",@progbits
.text.kernel:
\t//## File "{src}", line 2
        /*0000*/                   MOV R0, RZ ;
\t//## File "{src}", line 3
        /*0010*/                   MOV R1, RZ ;
.L_x_0:
\t//## File "{src}", line 4
        /*0020*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
\t//## File "{src}", line 6
        /*0030*/              @!P0 FFMA R0, R4, R5, R0 ;
\t//## File "{src}", line 2
        /*0040*/                   IADD3 R9, R9, 0x1, RZ ;
\t//## File "{src}", line 3
        /*0050*/                   ISETP.NE.AND P1, PT, R1, 0x5, PT ;
        /*0060*/               @P1 BRA `(.L_x_0) ;
\t//## File "{src}", line 7
        /*0070*/                   CALL.REL.NOINC `(helper) ;
        /*0080*/                   STG.E desc[UR4][R2.64], R0 ;
        /*0090*/                   EXIT ;
//--------------------- .text.helper  --------------------------
\t.section\t.text.helper,"ax",@progbits
helper:
.text.helper:
\t//## File "{src}", line 11
        /*00a0*/                   MOV R2, RZ ;
.L_x_1:
\t//## File "{src}", line 12
        /*00b0*/                   FMUL R0, R0, 2 ;
\t//## File "{src}", line 11
        /*00c0*/               @P2 BRA `(.L_x_1) ;
        /*00d0*/                   RET.REL.NODEC R20 `(kernel) ;
"""


@pytest.fixture
def canned(tmp_path):
    src = tmp_path / "kern.py"
    src.write_text(SOURCE)
    path = os.path.realpath(src)
    # the interpreter's line counts per program: the loop body runs 5 times, the `if` body 3 times
    # (context: "" the kernel, "helper" the function it calls, compiled apart), file, line -> runs per program
    counts = {("", path, 2): 1, ("", path, 3): 6, ("", path, 4): 5, ("", path, 5): 5, ("", path, 6): 3,
              ("", path, 7): 1, ("helper", path, 11): 5, ("helper", path, 12): 4}  # fmt: skip
    return SASS.format(src=path), counts, path


def test_parse_sass_functions_lines_and_targets(canned):
    sass, _, path = canned
    instrs, labels, label_fn = costmodel.parse_sass(sass)
    assert [i.opcode for i in instrs][:4] == ["MOV", "MOV", "LDG.E.128", "FFMA"]
    assert instrs[3].line == 6 and instrs[3].file == path and instrs[3].function == "kernel"
    assert labels[".L_x_0"] == 0x20 and labels["helper"] == 0xA0 and label_fn["helper"] == "helper"
    assert instrs[6].target == ".L_x_0" and instrs[7].target == "helper"
    assert [i.function for i in instrs].count("helper") == 4


def test_loops_are_backward_branches(canned):
    instrs, labels, _ = costmodel.parse_sass(canned[0])
    loops = costmodel.find_loops(instrs, labels)
    assert [(lp.function, lp.start, lp.end, lp.line) for lp in loops] == [
        ("kernel", 0x20, 0x60, 3),
        ("helper", 0xB0, 0xC0, 11),
    ]


def test_dynamic_counts(canned):
    """Loop instructions count the source loop's body runs (5; 4 in the helper), the FFMA under the runtime `if`
    its own line's runs (3), the helper's code once per executed CALL, the rest once."""
    sass, counts, _ = canned
    dyn = costmodel.dynamic_counts(sass, counts)
    # kernel: 2 before + 5 x (LDG, IADD3, ISETP, BRA) + 3 FFMA + CALL, STG, EXIT; helper: MOV, RET + 4 x (FMUL, BRA)
    assert dyn["instructions"] == 2 + 5 * 4 + 3 + 3 + 2 + 4 * 2
    assert dyn["ffma"] == 3 and dyn["mma"] == 0
    assert dyn["bytes"] == 5 * 32 * 16 + 32 * 4  # LDG.E.128 five times, STG.E (32-bit) once, 32 lanes
    main, helper = dyn["loops"]
    assert main["iterations"] == 5 and main["body_instructions"] == 5 and main["dot_loop"]
    assert main["ffma_mma_share"] == pytest.approx(1 / 5) and main["source"] == "kern.py:3"
    assert helper["iterations"] == 4 and not helper["dot_loop"] and helper["function"] == "helper"


def test_a_function_called_twice_shares_its_counts(canned):
    """Two CALLs of the helper (its line counts are the total of both entries): each entry runs the loop 4 times,
    so the copy's instructions count twice, not the total twice over."""
    sass, counts, path = canned
    sass = sass.replace(
        "        /*0080*/                   STG.E",
        "        /*0078*/                   CALL.REL.NOINC `(helper) ;\n        /*0080*/                   STG.E",
    )
    doubled = {k: (2 * v if k[0] == "helper" else v) for k, v in counts.items()}
    dyn = costmodel.dynamic_counts(sass, doubled)
    # kernel: 2 + 5 x 4 + 3 FFMA + CALL, CALL, STG, EXIT; helper: 2 entries x (MOV, RET + 4 x (FMUL, BRA))
    assert dyn["instructions"] == 2 + 5 * 4 + 3 + 4 + 2 * (2 + 4 * 2)
    assert dyn["loops"][1]["iterations"] == 8  # both entries together


def test_python_names_of_noinline_functions():
    label = "$chain_kernel$ebmfast_generated_chain_4a36_$__input_grad_2__Pfp32_Pfp32_i32_i32"
    assert costmodel.python_name(label) == "_input_grad_2"
    assert costmodel.python_name("$k$m_$__update__Pfp32_cTrue_cFalse") == "_update"
    assert costmodel.python_name("layer_fwd_kernel") == "layer_fwd_kernel"


def test_global_bytes_widths():
    assert costmodel.global_bytes("LDG.E.128") == 512
    assert costmodel.global_bytes("LDG.E.64.CONSTANT") == 256
    assert costmodel.global_bytes("STG.E") == 128
    assert costmodel.global_bytes("LDG.E.U8") == 32
    assert costmodel.global_bytes("FFMA") == 0 and costmodel.global_bytes("LDS.128") == 0


def test_occupancy_limits():
    h100 = costmodel.GPUS["H100"]
    # 4 warps of 255 registers: 256 x 32 = 8192 per warp -> 8 warps -> 2 CTAs
    assert costmodel.occupancy(h100, 255, 4, 0) == 2
    # 4 warps of 40 registers: registers allow 12 CTAs; 10 KB shared + 1 KB reserved allows 20
    assert costmodel.occupancy(h100, 40, 4, 10240) == 12
    # shared memory bound: 100 KB per CTA -> 2
    assert costmodel.occupancy(h100, 32, 4, 100 * 1024) == 2
    # warp slots: 16 warps per CTA, 64 per SM -> 4
    assert costmodel.occupancy(h100, 16, 16, 0) == 4


def test_time_bounds_arithmetic():
    g = costmodel.GPUS["H100"]
    f = g.clock_ghz * 1e9
    assert g.fp32_tflops == pytest.approx(132 * 128 * 2 * 1.98 / 1e3)
    # a full grid: 4 warps x 1000 programs x 1e4 instructions over 132 SMs x 4 schedulers
    t = costmodel.launch_time_s(g, 1e4, 1000, 4, 8)
    assert t == pytest.approx(1e4 * 4 * 1000 / (132 * 4 * f))
    # 8 programs of 4 warps: only 8 SMs issue
    assert costmodel.launch_time_s(g, 1e4, 8, 4, 8) == pytest.approx(1e4 * 4 * 8 / (8 * 4 * f))
    # one program of one warp: no faster than one instruction per cycle
    assert costmodel.launch_time_s(g, 1e4, 1, 1, 8) == pytest.approx(1e4 / f)
    rows = [dict(registers=64, num_warps=4, shared=0, instructions_per_program=1e4, programs=1000)]
    b = costmodel.step_bounds(g, rows, flops_per_step=1e9)
    assert b["flop_bound_us"] == pytest.approx(1e9 / (g.fp32_tflops * 1e12) * 1e6)
    assert b["lower_bound_us"] == max(b["flop_bound_us"], b["issue_bound_us"])


def test_measured_kernels_sum_per_name():
    profile = {
        "profiles": [
            {"backend": "triton", "batch": 128, "top": [{"name": "layer_fwd_kernel", "us_per_step": 2.0},
                                                        {"name": "layer_fwd_kernel", "us_per_step": 1.5}]},
            {"backend": "triton", "batch": 16384, "top": [{"name": "layer_fwd_kernel", "us_per_step": 9.0}]},
        ]
    }  # fmt: skip
    assert costmodel.measured_kernels(profile, "triton", 128) == {"layer_fwd_kernel": 3.5}


@pytest.mark.slow
def test_real_kernel_report():
    """The seed CNN's fused head at batch 32 (one launch of the triton backend's step), compiled for sm_90 with the
    installed Triton and counted under the interpreter: a PREDICTED report with registers, a dot loop, instructions."""
    pytest.importorskip("triton")
    from ebmfast.kernels import layers as L

    specs, shape = costmodel.seed_specs()
    calls = costmodel.backend_launches("triton", specs, shape, 32, 0, "meta")
    head = [i for i, c in enumerate(calls) if c.kernel is L.layer_head_kernel]
    doc = costmodel.predict("triton", 32, only=head)
    (row,) = doc["launches"]
    assert doc["status"] == "PREDICTED" and row["kernel"] == "layer_head_kernel"
    assert 0 < row["registers"] <= 255 and row["instructions_per_program"] > 100
    assert any(lp["dot_loop"] and lp["iterations"] >= 1 for lp in row["loops"])
    assert row["ffma"] > 0  # fp32: FMAs, no tensor cores
    text = costmodel.format_report(doc)
    assert "PREDICTED" in text and "layer_head_kernel" in text
    print(text)
