"""A static cost model of the kernel backends: every launch of one Langevin step, compiled for a GPU target on a
machine without one, read from its ptxas report and its SASS, with the loop trip counts the layer geometry and the
batch give. A tool, not a test: every figure it prints is PREDICTED; a measured run (``--measured``) is shown beside
the prediction per kernel so that the model is calibrated, not trusted.

    python bench/costmodel.py                                   # triton + persistent, seed CNN, batch 128 and 16384
    python bench/costmodel.py --backends triton --batch 128 --capability 90 80 --json out.json
    python bench/costmodel.py --python /tmp/t36/bin/python      # compile with another Triton (e.g. 3.6 in a venv)
    python bench/costmodel.py --measured OUTDIR/profile.json    # side by side with bench/profile_step.py's kernels

How it counts, per launch of a backend's step (``kernels.layers.step_calls`` for ``triton``, the one
``kernels.persistent.chain_call`` for ``persistent``; so any kernel those produce is measured, today's or a rewrite):

1. Compile (``bench/kernel_compile.py``, a subprocess with TRITON_INTERPRET unset; any Triton via ``--python``):
   registers, spill bytes, stack from ``ptxas -v``; shared memory from the compiled kernel; SASS with line info.
2. Loops: every backward branch in the SASS closes a loop (its body: the branch target up to the branch).
   Functions (the persistent kernel's ``noinline`` phases) are entered once per executed ``CALL`` to them.
3. Trip counts: the same launch runs under the Triton interpreter (a subprocess with TRITON_INTERPRET=1) on CPU
   tensors, with Python line counting: how many times each source line runs per program. A SASS loop's iterations
   per program are the executions of the body of the source ``for`` its back-edge branch belongs to; an instruction
   counts as often as its innermost loop (or its function's entries) iterates, or as often as its own source line
   ran when that line lies inside that loop and ran less (a runtime ``if``). The interpreter runs the first two
   programs along grid axis 0 (row tiles, whose trip counts do not depend on the row) and every program along the
   others; the persistent kernel runs one block of samples with 1 and 2 steps, a block-step is the difference, and
   each program runs its share of the batch's blocks.
   Not modelled: partial unrolling by the compiler (none seen in Triton's output), the software pipeliner's peeled
   iterations (counted as loop iterations), instruction latency, memory stalls.
4. Arithmetic, per launch and per step: warp-instructions (per program x warps x programs), FFMA and MMA
   (HMMA / HGMMA) shares, global bytes requested (LDG / STG / atomics widths x 32 lanes, an upper bound on traffic: no
   cache is modelled), occupancy (CTAs per SM from registers, shared memory and warps), and two lower bounds on time:
   issue-bound (each SM's 4 schedulers issue one warp-instruction per cycle each, only over the SMs and warps the grid
   occupies, and no warp faster than one instruction per cycle) and FLOP-bound (the step's useful FLOPs over the fp32
   FMA peak). The larger of the two is the predicted lower bound on time per step.

GPU figures (public datasheet facts; H200.md and KINDS.md of the device tool's notes): H100 SXM and H200 SXM, both
132 SMs, 4 warp schedulers per SM, 128 fp32 lanes per SM, boost clock 1.98 GHz (the SM clock an H200 of the device
machine read under load: 1980 MHz) -> fp32 FMA peak 132 x 128 x 2 x 1.98e9 = 66.9 TFLOP/s (the datasheet's "about
67"); memory bandwidth 3.35 TB/s (H100, 80 GB HBM3) and 4.8 TB/s (H200, HBM3e); per SM 65,536 registers,
228 KB shared memory (227 KB per CTA), 64 warps, 32 CTAs. sm_80 (A100 SXM): 108 SMs, 1.41 GHz, 164 KB shared memory.
"""

from __future__ import annotations

import argparse
import ast
import collections
import dataclasses
import datetime
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import kernel_compile  # noqa: E402  (bench/ is not a package)

PREDICTED = "PREDICTED"


# ----------------------------------------------------------------------------------------------- the GPUs
@dataclasses.dataclass(frozen=True)
class Gpu:
    name: str
    capability: int
    sms: int
    clock_ghz: float
    schedulers: int = 4
    fp32_lanes: int = 128
    regs_per_sm: int = 65536
    smem_per_sm: int = 228 * 1024
    max_warps: int = 64
    max_ctas: int = 32
    bandwidth_tb_s: float = 0.0

    @property
    def fp32_tflops(self) -> float:
        return self.sms * self.fp32_lanes * 2 * self.clock_ghz / 1e3

    @property
    def issue_per_s(self) -> float:
        return self.sms * self.schedulers * self.clock_ghz * 1e9


GPUS = {
    "H100": Gpu("H100 SXM", 90, 132, 1.98, bandwidth_tb_s=3.35),
    "H200": Gpu("H200 SXM", 90, 132, 1.98, bandwidth_tb_s=4.8),
    "A100": Gpu("A100 SXM", 80, 108, 1.41, smem_per_sm=164 * 1024, bandwidth_tb_s=2.0),
}


def occupancy(gpu: Gpu, registers: int, warps: int, shared: int) -> int:
    """CTAs per SM: the smallest of what the registers (allocated per warp in units of 256), the shared memory (1 KB
    reserved per CTA), the warp slots and the CTA slots allow."""
    per_warp = -(-max(1, registers) * 32 // 256) * 256
    by_regs = (gpu.regs_per_sm // per_warp) // warps
    by_smem = gpu.smem_per_sm // (shared + 1024) if shared else gpu.max_ctas
    return max(0, min(by_regs, by_smem, gpu.max_warps // warps, gpu.max_ctas))


# ----------------------------------------------------------------------------------------------- SASS
@dataclasses.dataclass
class Instr:
    addr: int
    function: str
    file: str | None
    line: int | None
    opcode: str  # mnemonic with its modifiers, e.g. "LDG.E.128", "FFMA", "@P1 BRA" -> "BRA"
    text: str
    target: str | None = None  # branch / call target label


_INSTR = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_LINE = re.compile(r'//## File "([^"]+)", line (\d+)')
_LABEL = re.compile(r"^(\.?[A-Za-z_$][\w.$]*):\s*$")
_FUNC = re.compile(r"^\s*\.text\.([\w$]+):\s*$")


def parse_sass(text: str) -> tuple[list[Instr], dict[str, int], dict[str, str]]:
    """Instructions (with function, source file and line), label addresses and each label's function, from
    ``nvdisasm -c -g`` output. A function starts at a ``.text.NAME`` section or at a label that a ``CALL`` targets
    (Triton's ``noinline`` functions share their kernel's section)."""
    called = set(re.findall(r"CALL\.[\w.]*\s+`\(([^)]+)\)", text))
    instrs: list[Instr] = []
    labels: dict[str, int] = {}
    label_fn: dict[str, str] = {}
    func, file, line = "", None, None
    pending: list[str] = []
    for raw in text.splitlines():
        m = _FUNC.match(raw)
        if m:
            func = m.group(1)
            pending.append(func)
            continue
        m = _LINE.search(raw)
        if m:
            file, line = os.path.realpath(m.group(1)), int(m.group(2))
            continue
        m = _LABEL.match(raw.strip()) if not raw.startswith("\t.") else None
        if m and "/*" not in raw:
            if m.group(1) in called:
                func = m.group(1)
            pending.append(m.group(1))
            continue
        m = _INSTR.match(raw)
        if not m:
            continue
        addr, body = int(m.group(1), 16), m.group(2)
        for name in pending:
            labels[name] = addr
            label_fn[name] = func
        pending = []
        words = body.split()
        if words and words[0].startswith("@"):
            words = words[1:]
        op = words[0] if words else ""
        tgt = re.search(r"`\(([^)]+)\)", body)
        instrs.append(Instr(addr, func, file, line, op, body, tgt.group(1) if tgt else None))
    return instrs, labels, label_fn


def python_name(sass_function: str) -> str:
    """The Python name of a Triton function from its SASS label: ``$kernel$module_$__name__Pfp32_i32...`` (a
    ``noinline`` function, mangled with its argument types) -> ``_name``; a plain name stays as it is."""
    tail = sass_function.rsplit("$", 1)[-1]
    if tail.startswith("__"):
        tail = tail[1:]
    return tail.split("__", 1)[0] if "__" in tail[1:] else tail


@dataclasses.dataclass
class Loop:
    function: str
    start: int  # address of the first instruction of the body (the branch target)
    end: int  # address of the backward branch
    file: str | None  # source position of the backward branch
    line: int | None


def find_loops(instrs: list[Instr], labels: dict[str, int]) -> list[Loop]:
    """Every backward branch closes a loop from its target to itself (innermost first when sorted by size)."""
    loops = []
    for ins in instrs:
        if ins.opcode.startswith("BRA") and ins.target in labels and labels[ins.target] <= ins.addr:
            loops.append(Loop(ins.function, labels[ins.target], ins.addr, ins.file, ins.line))
    return loops


def innermost(loops: list[Loop], ins: Instr) -> Loop | None:
    best = None
    for lp in loops:
        if lp.function == ins.function and lp.start <= ins.addr <= lp.end:
            if best is None or lp.end - lp.start < best.end - best.start:
                best = lp
    return best


_FMA = re.compile(r"^(FFMA|FFMA2)(\.|$)")
_MMA = re.compile(r"^(HMMA|HGMMA|IMMA|DMMA|QGMMA|BMMA)(\.|$)")
_MEM = re.compile(r"^(LDG|STG|ATOMG|RED|LDGSTS|LDL|STL)(\.|$)")


def global_bytes(op: str) -> int:
    """Bytes one warp-instruction requests from global (or local) memory, all 32 lanes active: the width suffix
    (.64 / .128; 32-bit by default, .U8 / .S16 ...) x 32. Zero for other instructions."""
    if not _MEM.match(op):
        return 0
    width = 32
    for part in op.split(".")[1:]:
        if part in ("64", "128", "U8", "S8", "U16", "S16"):
            width = {"64": 64, "128": 128, "U8": 8, "S8": 8, "U16": 16, "S16": 16}[part]
    return 32 * width // 8


# ----------------------------------------------------------------------------------------------- source loops
class SourceLoops:
    """The ``for`` statements of the kernels' source files: for each one, its line, the first line of its body and
    the lines its body spans; and the span of each function."""

    def __init__(self) -> None:
        self._files: dict[str, tuple[list[tuple[int, int, int, int]], list[tuple[int, int]]]] = {}

    def _parse(self, path: str):
        if path not in self._files:
            fors, funcs = [], []
            try:
                tree = ast.parse(Path(path).read_text())
            except (OSError, SyntaxError):
                tree = ast.Module(body=[], type_ignores=[])
            for node in ast.walk(tree):
                if isinstance(node, ast.For):
                    fors.append((node.lineno, node.body[0].lineno, node.body[0].lineno, node.end_lineno))
                elif isinstance(node, ast.FunctionDef):
                    funcs.append((node.lineno, node.end_lineno))
            self._files[path] = (fors, funcs)
        return self._files[path]

    def loop_at(self, path: str | None, line: int | None) -> tuple[int, int, int] | None:
        """(for line, first body line, last body line) of the innermost ``for`` whose header or body holds ``line``."""
        if path is None or line is None:
            return None
        best = None
        for head, first, _lo, hi in self._parse(path)[0]:
            if head <= line <= hi and (best is None or head > best[0]):
                best = (head, first, hi)
        return best


# ----------------------------------------------------------------------------------------------- dynamic counts
def dynamic_counts(
    sass: str, line_counts: dict[tuple[str, str, int], float], sources: SourceLoops | None = None
) -> dict:
    """Per program: executions of each instruction, from the SASS and the per-program source line counts
    ``{(context, realpath, line): runs}``, where the context is the Python name of the function the kernel called
    (empty for the kernel itself). A context that names a SASS function (a ``noinline`` callee) counts for that
    function, shared among its copies (specialisations) by their entries; every other context was inlined and counts
    for the kernel. Returns {"instructions", "ffma", "mma", "bytes", "loops": [...]} where each loop has its body's
    static size, its iterations, its FFMA/MMA share and its source position."""
    sources = sources or SourceLoops()
    instrs, labels, label_fn = parse_sass(sass)
    loops = find_loops(instrs, labels)
    funcs = list(dict.fromkeys(ins.function for ins in instrs))
    contexts = {ctx for ctx, _, _ in line_counts}
    ctx_of = {f: python_name(f) if i and python_name(f) in contexts else "" for i, f in enumerate(funcs)}
    merged: dict[tuple[str, str, int], float] = collections.defaultdict(float)
    callee_contexts = {ctx_of[f] for f in funcs[1:]} - {""}
    for (ctx, path, line), n in line_counts.items():
        merged[(ctx if ctx in callee_contexts else "", path, line)] += n
    calls: dict[str, list[Instr]] = collections.defaultdict(list)
    for ins in instrs:
        if ins.opcode.startswith("CALL") and ins.target in label_fn:
            calls[label_fn[ins.target]].append(ins)
    entries: dict[str, float] = {}
    count: dict[int, float] = {}

    def share(fn: str) -> float:
        """This copy's part of its context's counts: its entries over those of every copy of the context."""
        if fn == funcs[0] or not ctx_of[fn]:
            return 1.0
        total = sum(entries_of(g) for g in funcs if ctx_of[g] == ctx_of[fn])
        return entries_of(fn) / total if total else 0.0

    def runs(fn: str, path, line) -> float:
        return merged.get((ctx_of[fn], path, line), 0.0) * share(fn)

    trips: dict[int, float] = {}
    spans: dict[int, tuple[str, int, int] | None] = {}

    def loop_trips(j: int) -> float:
        if j not in trips:
            lp = loops[j]
            src = sources.loop_at(lp.file, lp.line)
            spans[j] = (lp.file, src[0], src[2]) if src else None
            trips[j] = runs(lp.function, lp.file, src[1]) if src else 0.0
        return trips[j]

    def instr_count(ins: Instr) -> float:
        lp = innermost(loops, ins)
        if lp is not None:
            j = loops.index(lp)
            base, span = loop_trips(j), spans[j]
        else:
            base, span = entries_of(ins.function), None
        if span is not None and ins.file == span[0] and ins.line is not None and span[1] < ins.line <= span[2]:
            own = runs(ins.function, ins.file, ins.line)
            if 0 < own < base:
                return own
        return base

    def entries_of(fn: str) -> float:
        if fn not in entries:
            entries[fn] = 0.0  # recursion guard
            sites = calls.get(fn)
            if not sites:
                entries[fn] = 1.0 if fn == funcs[0] else 0.0
            else:
                entries[fn] = sum(instr_count(s) for s in sites)
        return entries[fn]

    for idx, ins in enumerate(instrs):
        count[idx] = instr_count(ins)
    total = sum(count.values())
    ffma = sum(c for i, c in count.items() if _FMA.match(instrs[i].opcode))
    mma = sum(c for i, c in count.items() if _MMA.match(instrs[i].opcode))
    nbytes = sum(c * global_bytes(instrs[i].opcode) for i, c in count.items())
    loop_rows = []
    for j, lp in enumerate(loops):
        body = [ins for ins in instrs if innermost(loops, ins) is lp]
        n_fma = sum(1 for ins in body if _FMA.match(ins.opcode))
        n_mma = sum(1 for ins in body if _MMA.match(ins.opcode))
        loop_rows.append(
            {
                "function": python_name(lp.function),
                "source": f"{Path(lp.file).name}:{spans[j][1]}" if spans.get(j) else None,
                "body_instructions": len(body),
                "iterations": loop_trips(j),
                "ffma_mma_share": (n_fma + n_mma) / len(body) if body else 0.0,
                "dot_loop": bool(n_fma or n_mma),
            }
        )
    return {"instructions": total, "ffma": ffma, "mma": mma, "bytes": nbytes, "loops": loop_rows}


# ----------------------------------------------------------------------------------------------- time bounds
def launch_time_s(gpu: Gpu, warp_instr_per_program: float, programs: int, warps: int, ctas_per_sm: int) -> float:
    """Issue-bound lower bound of one launch: its warp-instructions over the schedulers the grid can keep busy (SMs
    with a CTA, at most 4 schedulers each, no more than the resident warps), and no warp issuing faster than one
    instruction per cycle."""
    if programs <= 0 or warp_instr_per_program <= 0:
        return 0.0
    sms_busy = min(gpu.sms, programs)
    resident = max(1, min(max(1, ctas_per_sm), -(-programs // sms_busy))) * warps
    total = warp_instr_per_program * warps * programs
    rate = sms_busy * min(gpu.schedulers, resident) * gpu.clock_ghz * 1e9
    per_warp = warp_instr_per_program / (gpu.clock_ghz * 1e9)  # one warp's own instruction stream
    return max(total / rate, per_warp)


def step_bounds(gpu: Gpu, launches: list[dict], flops_per_step: float) -> dict:
    """Per step: issue-bound (launches back to back), FLOP-bound (useful FLOPs at the fp32 FMA peak), their max."""
    issue = 0.0
    for row in launches:
        ctas = occupancy(gpu, row["registers"], row["num_warps"], row["shared"])
        issue += launch_time_s(gpu, row["instructions_per_program"], row["programs"], row["num_warps"], ctas)
    flop = flops_per_step / (gpu.fp32_tflops * 1e12)
    return {"issue_bound_us": issue * 1e6, "flop_bound_us": flop * 1e6, "lower_bound_us": max(issue, flop) * 1e6}


# ----------------------------------------------------------------------------------------------- the launches
def seed_specs(hidden_features: int = 32):
    from ebmfast.layers import plan_layers
    from ebmfast.models import CNNModel

    return plan_layers(CNNModel(hidden_features=hidden_features), (1, 28, 28)), (1, 28, 28)


def _tensors(specs, shape, batch: int, device: str, programs_scratch: int = 0):
    import torch

    t = dict(dtype=torch.float32, device=device)
    weights, biases = [], []
    for s in specs:
        w = torch.randn(s.c_out, s.c_in * s.kh * s.kw, **t) * 0.1 if device != "meta" else torch.empty(s.c_out, 1, **t)
        weights.append(w.contiguous())
        biases.append(torch.randn(s.c_out, **t) * 0.1 if device != "meta" else torch.empty(s.c_out, **t))
    x = torch.rand(batch, *shape, **t) * 2 - 1 if device != "meta" else torch.empty(batch, *shape, **t)
    rng = torch.tensor([7, 0], dtype=torch.int64, device=device)
    return x, weights, biases, rng


STEP = dict(step_size=10.0, grad_clip=0.03, noise_std=0.005, lo=-1.0, hi=1.0)


def backend_launches(backend: str, specs, shape, batch: int, precision: int, device: str = "meta", steps: int = 1,
                     rows_cap: int | None = None, one_block: bool = False) -> list:  # fmt: skip
    """The launches (``KernelCall``) of one Langevin step of ``backend`` at ``batch``, with the GPU's settings
    (``interpreted=False``): ``triton`` every launch of ``step_calls`` (the sampler's step: stream noise);
    ``persistent`` the one chain launch of ``steps`` steps (132 SMs). Tensors on ``device``; ``rows_cap`` (CPU
    counting runs) allocates per-sample tensors for at most that many samples while the launch keeps ``batch``;
    ``one_block`` (persistent counting runs) keeps ``batch``'s settings but gives the launch one block of samples."""
    import torch

    from ebmfast.kernels import layers as L

    if backend == "triton":
        full = _tensors(specs, shape, batch, "meta")
        x, w, b, rng = full
        calls = L.step_calls(specs, x, w, w, [w[0]] * (len(specs) - 1), precision, L.MODE_STEP, rng=rng,
                             add_noise=True, interpreted=False, **STEP)  # fmt: skip
        if device == "meta":
            return calls
        small = min(batch, rows_cap or batch)
        xs, ws, bs, rngs = _tensors(specs, shape, small, device)
        scratch = [torch.empty(small * s.d_out, dtype=torch.float32, device=device) for s in specs[:-1]]
        real = L.step_calls(specs, xs, ws, bs, scratch, precision, L.MODE_STEP, rng=rngs, add_noise=True,
                            interpreted=False, **STEP)  # fmt: skip
        out = []
        for c, r in zip(calls, real):  # the full launch's arguments, the small tensors
            args = {k: (r.args[k] if hasattr(v, "data_ptr") else v) for k, v in c.args.items()}
            out.append(c._replace(args=args))
        return out
    if backend == "persistent":
        from ebmfast.kernels import persistent as P

        settings = P.chain_settings(specs, batch, interpreted=False, sm_count=GPUS["H100"].sms)
        x, w, b, rng = _tensors(specs, shape, settings.block if one_block else batch, device)
        per_program = P.scratch_layout(specs, settings.block)[1]
        n_scr = settings.programs * per_program if device == "meta" else per_program
        scratch = torch.empty(n_scr, dtype=torch.float32, device=device)
        return [P.chain_call(specs, x, rng, w, b, scratch, precision, settings, steps, **STEP)]
    raise ValueError(f"backend: expected 'triton' or 'persistent', got {backend!r}")


def settings_block(specs, batch: int) -> int:
    from ebmfast.kernels import persistent as P

    return P.chain_settings(specs, batch, interpreted=False, sm_count=GPUS["H100"].sms).block


def _label(call, i: int) -> str:
    a = call.args
    name = call.kernel.fn.__name__ if hasattr(call.kernel, "fn") else str(call.kernel)
    tiles = "x".join(str(a[k]) for k in ("BM", "BN", "BK") if k in a)
    return f"{i}:{name}" + (f"[{tiles}]" if tiles else "")


# ----------------------------------------------------------------------------------------------- trip counting
_COUNT_ROWS_CAP = 260  # samples allocated for a counting run: two row tiles of at most 128 rows, plus a sample


def count_lines(backend: str, hidden: int, batch: int, precision: int, only: list[int] | None = None) -> list[dict]:
    """Runs under TRITON_INTERPRET=1: per launch (those in ``only``, default all), {"file:line": runs per program}
    (persistent: per program and step, the 2-step run minus the 1-step run)."""
    import torch

    specs, shape = seed_specs(hidden)
    watched = {os.path.realpath(str(ROOT / "kernels"))}

    def run(call, grid) -> tuple[collections.Counter, int]:
        counts: collections.Counter = collections.Counter()
        context: dict = {}  # frame -> the Python name of the function the kernel called ("" for the kernel)

        def local(frame, event, arg):
            if event == "line":
                counts[(context.get(frame, ""), os.path.realpath(frame.f_code.co_filename), frame.f_lineno)] += 1
            elif event == "return":
                context.pop(frame, None)
            return local

        def tracer(frame, event, arg):
            path = os.path.realpath(frame.f_code.co_filename)
            if os.path.dirname(path) in watched or "ebmfast_generated" in frame.f_globals.get("__name__", ""):
                parent = frame.f_back
                while parent is not None and parent not in context:
                    parent = parent.f_back
                if parent is None:
                    context[frame] = ""  # the kernel
                else:
                    context[frame] = context[parent] or frame.f_code.co_name
                return local
            return None

        sys.settrace(tracer)
        try:
            call.kernel[grid](**call.args, num_warps=call.num_warps)
        finally:
            sys.settrace(None)
        return counts, grid[0] * grid[1] * grid[2]

    out = []
    torch.manual_seed(0)
    if backend == "triton":
        for i, call in enumerate(
            backend_launches(backend, specs, shape, batch, precision, "cpu", rows_cap=_COUNT_ROWS_CAP)
        ):
            if only is not None and i not in only:
                continue
            grid = (min(call.grid[0], 2), call.grid[1], call.grid[2])
            counts, n = run(call, grid)
            out.append({f"{ctx}|{p}:{ln}": c / n for (ctx, p, ln), c in counts.items()})
    else:
        # one block of samples (program 0's first): a program's blocks all run the same loops
        one = run(backend_launches(backend, specs, shape, batch, precision, "cpu", 1, one_block=True)[0], (1, 1, 1))[0]
        two = run(backend_launches(backend, specs, shape, batch, precision, "cpu", 2, one_block=True)[0], (1, 1, 1))[0]
        out.append({f"{ctx}|{p}:{ln}": two[(ctx, p, ln)] - one.get((ctx, p, ln), 0) for (ctx, p, ln) in two})
    return out


def _counts_from(doc: dict) -> dict[tuple[str, str, int], float]:
    out = {}
    for key, v in doc.items():
        ctx, _, rest = key.partition("|")
        path, line = rest.rsplit(":", 1)
        out[(ctx, path, int(line))] = float(v)
    return out


def line_counts(backend: str, hidden: int, batch: int, precision: int, only: list[int] | None = None
                ) -> list[dict[tuple[str, str, int], float]]:  # fmt: skip
    """``count_lines`` in a subprocess with the Triton interpreter."""
    env = dict(os.environ, TRITON_INTERPRET="1", EBMFAST_TRITON_ON_CPU="1", PYTHONPATH=str(ROOT))
    job = json.dumps([backend, hidden, batch, precision, only])
    res = subprocess.run([sys.executable, __file__, "--count-lines", job], env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"counting run failed: {res.stderr.strip()[-3000:]}")
    return [_counts_from(d) for d in json.loads(res.stdout.strip().splitlines()[-1])]


# ----------------------------------------------------------------------------------------------- the model
def flops_per_step(specs, batch: int) -> float:
    """Useful FLOPs of one step: forward and input gradient of every layer (2 x multiply-adds x 2)."""
    return 2.0 * batch * sum(s.flops_per_sample() for s in specs)


def resources(backend: str, batch: int, precision: int = 0, capability: int = 90, hidden: int = 32,
              python: str | None = None) -> list[dict]:  # fmt: skip
    """The compile report alone (no counting run) of every launch of one step: registers, spills, stack, shared
    memory, per launch, with the Triton that compiled it (e.g. a spill check with several Triton versions)."""
    specs, shape = seed_specs(hidden)
    calls = backend_launches(backend, specs, shape, batch, precision, "meta", steps=1)
    compiled = kernel_compile.run_jobs([kernel_compile.compile_job(c, capability) for c in calls], python)
    return [
        {"launch": _label(c, i), "grid": list(c.grid), "num_warps": c.num_warps, "shared": comp["shared"],
         "triton": comp["triton"], **{k: v for k, v in comp["ptxas"].items() if k != "ptxas"}}
        for i, (c, comp) in enumerate(zip(calls, compiled))
    ]  # fmt: skip


def predict(backend: str, batch: int, precision: int = 0, capability: int = 90, hidden: int = 32,
            python: str | None = None, only: list[int] | None = None) -> dict:  # fmt: skip
    """Every launch (or those numbered in ``only``) of one step of ``backend`` at ``batch``: compile report, dynamic
    counts and time bounds. The step figures cover the launches included."""
    specs, shape = seed_specs(hidden)
    calls = backend_launches(backend, specs, shape, batch, precision, "meta", steps=1)
    picked = [i for i in range(len(calls)) if only is None or i in only]
    calls = [calls[i] for i in picked]
    compiled = kernel_compile.run_jobs([kernel_compile.compile_job(c, capability) for c in calls], python)
    counts = line_counts(backend, hidden, batch, precision, only)
    sources = SourceLoops()
    rows = []
    for i, call, comp, lc in zip(picked, calls, compiled, counts):
        dyn = dynamic_counts(comp["sass"], lc, sources)
        programs = call.grid[0] * call.grid[1] * call.grid[2]
        if backend == "persistent":  # counted for one block-step: a program runs n_blocks / programs blocks
            blocks = -(-call.args["N"] // settings_block(specs, batch))
            dyn = {k: (v * blocks / programs if k in ("instructions", "ffma", "mma", "bytes") else v)
                   for k, v in dyn.items()}  # fmt: skip
        rep = comp["ptxas"]
        rows.append(
            {
                "launch": _label(call, i),
                "kernel": call.kernel.fn.__name__,
                "grid": list(call.grid),
                "programs": programs,
                "num_warps": call.num_warps,
                "registers": rep["registers"],
                "spill_bytes": rep["spill_stores"] + rep["spill_loads"],
                "stack": rep["stack"],
                "shared": comp["shared"],
                "instructions_per_program": dyn["instructions"],
                "warp_instructions": dyn["instructions"] * call.num_warps * programs,
                "ffma": dyn["ffma"] * call.num_warps * programs,
                "mma": dyn["mma"] * call.num_warps * programs,
                "bytes": dyn["bytes"] * call.num_warps * programs,
                "loops": dyn["loops"],
                "triton": comp["triton"],
            }
        )
    flops = flops_per_step(specs, batch)
    total = sum(r["warp_instructions"] for r in rows)
    fma_mma = sum(r["ffma"] + r["mma"] for r in rows)
    gpus = {k: step_bounds(g, rows, flops) for k, g in GPUS.items() if g.capability == capability}
    for key, g in GPUS.items():
        if g.capability != capability:
            continue
        for r in rows:
            ctas = occupancy(g, r["registers"], r["num_warps"], r["shared"])
            r.setdefault("ctas_per_sm", {})[key] = ctas
            t = launch_time_s(g, r["instructions_per_program"], r["programs"], r["num_warps"], ctas)
            r.setdefault("issue_bound_us", {})[key] = t * 1e6
        gpus[key]["issue_peak_fraction"] = (
            (flops / (g.fp32_tflops * 1e12)) / (gpus[key]["lower_bound_us"] * 1e-6) if total else 0.0
        )
    return {
        "status": PREDICTED,
        "backend": backend,
        "batch": batch,
        "precision": precision,
        "capability": capability,
        "triton": rows[0]["triton"] if rows else None,
        "launches": rows,
        "per_step": {
            "warp_instructions": total,
            "warp_instructions_per_sample": total / batch,
            "ffma_mma_share": fma_mma / total if total else 0.0,
            "bytes": sum(r["bytes"] for r in rows),
            "flops": flops,
            "spill_bytes": sum(r["spill_bytes"] for r in rows),
        },
        "gpus": gpus,
    }


# ----------------------------------------------------------------------------------------------- report
def measured_kernels(profile: dict, backend: str, batch: int) -> dict[str, float]:
    """{kernel name: measured us per step} from bench/profile_step.py's JSON (its "profiles" rows' "top" kernels)."""
    out: dict[str, float] = {}
    for row in profile.get("profiles", []):
        if row.get("backend") == backend and row.get("batch") == batch:
            for k in row.get("top", []):
                name = str(k.get("name", "")).split("(")[0].split()[-1] if k.get("name") else ""
                out[name] = out.get(name, 0.0) + float(k.get("us_per_step", 0.0))
    return out


def format_report(doc: dict, measured: dict[str, float] | None = None) -> str:
    gk = [k for k in doc["gpus"]]
    lines = [
        f"{PREDICTED} cost of one step: backend {doc['backend']}, batch {doc['batch']}, PREC {doc['precision']}, "
        f"sm_{doc['capability']}, Triton {doc['triton']}",
        f"{'launch':34} {'grid':>14} {'w':>2} {'regs':>4} {'spill':>5} {'smem':>6} {'CTA/SM':>6} "
        f"{'warp-instr':>11} {'FMA/MMA%':>8} {'MB':>8} " + " ".join(f"{'us ' + k:>9}" for k in gk)
        + ("  measured us (kernel total)" if measured else ""),
    ]  # fmt: skip
    shown = set()
    for r in doc["launches"]:
        share = (r["ffma"] + r["mma"]) / r["warp_instructions"] if r["warp_instructions"] else 0.0
        meas = ""
        if measured is not None and r["kernel"] not in shown:
            shown.add(r["kernel"])
            v = measured.get(r["kernel"])
            meas = f"  {v:.1f}" if v is not None else "  not measured"
        lines.append(
            f"{r['launch']:34} {str(tuple(r['grid'])):>14} {r['num_warps']:>2} {r['registers']:>4} "
            f"{r['spill_bytes']:>5} {r['shared']:>6} {r['ctas_per_sm'][gk[0]]:>6} {r['warp_instructions']:>11.3g} "
            f"{100 * share:>7.1f}% {r['bytes'] / 1e6:>8.2f} "
            + " ".join(f"{r['issue_bound_us'][k]:>9.2f}" for k in gk) + meas
        )  # fmt: skip
    ps = doc["per_step"]
    lines.append(
        f"per step: {ps['warp_instructions']:.4g} warp-instructions ({ps['warp_instructions_per_sample']:.0f} per "
        f"sample-step), FFMA/MMA share {100 * ps['ffma_mma_share']:.1f}%, {ps['bytes'] / 1e6:.1f} MB requested, "
        f"{ps['flops'] / 1e6:.1f} MFLOP useful, spill bytes {ps['spill_bytes']}"
    )
    for k, b in doc["gpus"].items():
        lines.append(
            f"  {GPUS[k].name}: issue-bound {b['issue_bound_us']:.1f} us, FLOP-bound {b['flop_bound_us']:.1f} us -> "
            f"{PREDICTED} lower bound {b['lower_bound_us']:.1f} us per step "
            f"({100 * b['issue_peak_fraction']:.0f}% of the fp32 FMA peak at that bound)"
        )
    for r in doc["launches"]:
        for lp in r["loops"]:
            if lp["dot_loop"]:
                lines.append(
                    f"  dot loop {r['launch']} {lp['source']}: {lp['body_instructions']} instructions per iteration, "
                    f"{lp['iterations']:.1f} iterations per program, FFMA/MMA share {100 * lp['ffma_mma_share']:.0f}%"
                )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--backends", nargs="+", default=["triton", "persistent"], choices=["triton", "persistent"])
    ap.add_argument("--batch", nargs="+", type=int, default=[128, 16384])
    ap.add_argument("--precision", type=int, default=0, choices=[0, 1, 2], help="0 fp32, 1 tf32, 2 bf16")
    ap.add_argument("--capability", nargs="+", type=int, default=[90], help="90 (H100/H200), 80 (A100)")
    ap.add_argument("--hidden-features", type=int, default=32)
    ap.add_argument("--python", default=None, help="the interpreter whose Triton compiles (default: this one)")
    ap.add_argument("--measured", default=None, help="bench/profile_step.py's JSON of a GPU run (side by side)")
    ap.add_argument("--json", default=None, help="write every figure here")
    ap.add_argument("--resources-only", action="store_true", help="registers / spills / shared memory only")
    ap.add_argument("--count-lines", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.count_lines:  # the interpreter worker
        backend, hidden, batch, prec, only = json.loads(args.count_lines)
        out = count_lines(backend, hidden, batch, prec, only)
        print(json.dumps(out))
        return 0
    profile = json.loads(Path(args.measured).read_text()) if args.measured else None
    docs = []
    for cap in args.capability:
        for backend in args.backends:
            for batch in args.batch:
                if args.resources_only:
                    rows = resources(backend, batch, args.precision, cap, args.hidden_features, args.python)
                    docs.append({"backend": backend, "batch": batch, "capability": cap, "launches": rows})
                    for r in rows:
                        print(f"{backend} b{batch} sm_{cap} Triton {r['triton']} {r['launch']:34} warps "
                              f"{r['num_warps']} regs {r['registers']:>3} spill {r['spill_stores']}/"
                              f"{r['spill_loads']} B stack {r['stack']} shared {r['shared']}", flush=True)  # fmt: skip
                    continue
                doc = predict(backend, batch, args.precision, cap, args.hidden_features, args.python)
                doc["date"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
                doc["compiled_on"] = f"{platform.machine()} {platform.node()} (no GPU)"
                docs.append(doc)
                meas = measured_kernels(profile, backend, batch) if profile else None
                print(format_report(doc, meas), flush=True)
                print()
    if args.json:
        Path(args.json).write_text(json.dumps(docs, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
