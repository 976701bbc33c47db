"""Ahead-of-time compile of one Triton kernel launch for an NVIDIA target, without a GPU: the signature of a launch,
the compile itself, the ``ptxas -v`` resource report and the disassembly (``nvdisasm`` with line info), with the
tools of whichever Triton runs it.

Used in-process (``compile_call``: the installed Triton; tests/test_layers.py and tests/test_persistent.py) and as a
worker for another Triton (``python bench/kernel_compile.py < job.json`` under another interpreter, e.g. a virtual
environment holding an older Triton and no torch): a job names the kernel's source file and function, the signature,
the constexprs, the warps and the target; the worker compiles it and prints one JSON line with the PTX resource report,
the SASS, the shared memory and the Triton version. The worker imports no torch: it registers the package folders
``ebmfast`` and ``ebmfast.kernels`` by path (their ``__init__`` files, which import torch, are not run), so a kernel
module's ``from ebmfast.kernels.layers import ...`` resolves to this checkout's ``kernels/``.

Triton's compile API: ``triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget(...), options=...)``
with constexprs keyed by parameter name (Triton 3.6 and 3.8 alike); ``get_ptxas`` takes the architecture in 3.8 and
nothing in 3.6 (``ptxas_report`` handles both).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

__all__ = ["call_signature", "compile_call", "ptxas_report", "disassemble", "compile_job", "run_job", "run_jobs"]

_POINTER_TYPES = {"torch.float32": "*fp32", "torch.int64": "*i64", "torch.bfloat16": "*bf16", "torch.float16": "*fp16"}


def call_signature(call) -> tuple[dict, dict]:
    """(signature, constexprs) of a launch (a ``kernels.layers.KernelCall``), as ``triton.compiler.ASTSource`` takes
    them: tensors (any device, ``meta`` included) become pointer types, Python ints i32 (i64 beyond 32 bits), floats
    fp32."""
    sig, constexprs = {}, {}
    for name, is_constexpr in _params(call.kernel):
        v = call.args[name]
        if is_constexpr:
            sig[name] = "constexpr"
            constexprs[name] = v
        elif hasattr(v, "dtype") and hasattr(v, "data_ptr"):
            sig[name] = _POINTER_TYPES[str(v.dtype)]
        elif isinstance(v, bool):
            sig[name] = "i1"
        elif isinstance(v, int):
            sig[name] = "i32" if -(2**31) <= v < 2**31 else "i64"
        elif isinstance(v, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{name}: cannot type {type(v).__name__} for an ahead-of-time compile")
    return sig, constexprs


def _params(kernel) -> list[tuple[str, bool]]:
    """(name, is constexpr) of a kernel's parameters: from a compiled ``JITFunction``'s ``params``, or from the
    annotations of the function an interpreted one wraps (a process with TRITON_INTERPRET=1 can still describe a
    compile job for another process)."""
    params = getattr(kernel, "params", None)
    if params is not None:
        return [(p.name, bool(p.is_constexpr)) for p in params]
    fn = getattr(kernel, "fn", kernel)
    return [(name, "constexpr" in str(p.annotation)) for name, p in inspect.signature(fn).parameters.items()]


def _compile(fn, sig: dict, constexprs: dict, num_warps: int, capability: int, warp_size: int = 32):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", capability, warp_size), options={"num_warps": num_warps})


def compile_call(call, capability: int = 90, warp_size: int = 32):
    """Compile one launch's specialisation for an NVIDIA target with the installed Triton (default sm_90, Hopper).
    Needs the compiled Triton (TRITON_INTERPRET unset when the kernel module was imported)."""
    sig, constexprs = call_signature(call)
    return _compile(call.kernel, sig, constexprs, call.num_warps, capability, warp_size)


def _nvidia_bin(name: str) -> str:
    import triton.backends.nvidia as nv

    path = Path(nv.__file__).parent / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"{name}: expected in Triton's NVIDIA backend at {path}, not found")
    return str(path)


def _ptxas(capability: int) -> str:
    from triton.backends.nvidia.compiler import get_ptxas

    try:
        ptxas = get_ptxas(capability)  # triton 3.8: the tool for the architecture
    except TypeError:
        ptxas = get_ptxas()  # older: one ptxas
    return ptxas.path if hasattr(ptxas, "path") else ptxas[0]


def ptxas_report(ptx: str, arch: str = "sm_90a") -> dict:
    """Registers, spill bytes and static shared memory of a PTX module as ``ptxas -v`` reports them (the ptxas
    Triton ships; no GPU needed). Keys: registers (the entry function's, per thread), spill_stores, spill_loads,
    stack, shared (static; Triton's dynamic shared memory is ``CompiledKernel.metadata.shared``), all bytes summed over
    the functions, and ``ptxas`` (the whole report)."""
    exe = _ptxas(int(re.sub(r"\D", "", arch)))
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        res = subprocess.run(
            [exe, "-v", f"--gpu-name={arch}", str(src), "-o", str(Path(tmp) / "k.cubin")],
            capture_output=True,
            text=True,
            check=True,
        )
    text = res.stderr + res.stdout

    def total(pattern: str) -> int:  # summed over the kernel and the functions it calls
        return sum(int(v) for v in re.findall(pattern, text))

    return {
        "registers": total(r"Used (\d+) registers"),  # ptxas reports registers for the entry function only
        "spill_stores": total(r"(\d+) bytes spill stores"),
        "spill_loads": total(r"(\d+) bytes spill loads"),
        "stack": total(r"(\d+) bytes stack frame"),
        "shared": total(r"(\d+) bytes smem"),
        "ptxas": text.strip(),
    }


def disassemble(cubin: bytes) -> str:
    """The SASS of a cubin with source line information (``nvdisasm -c -g``: one ``//## File "...", line N``
    comment before each run of instructions from one source line)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        res = subprocess.run([_nvidia_bin("nvdisasm"), "-c", "-g", str(path)], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"nvdisasm failed (rc {res.returncode}): {res.stderr.strip()[-500:]}")
    return res.stdout


def compile_job(call, capability: int = 90) -> dict:
    """A JSON-able description of one launch's compile: source file and function of the kernel, signature,
    constexprs, warps, target."""
    sig, constexprs = call_signature(call)
    fn = call.kernel.fn
    return {
        "file": os.path.realpath(inspect.getsourcefile(fn)),
        "module": fn.__module__,
        "function": fn.__name__,
        "signature": sig,
        "constexprs": constexprs,
        "num_warps": int(call.num_warps),
        "capability": int(capability),
    }


def _register_packages() -> None:
    """``ebmfast`` and ``ebmfast.kernels`` as bare package objects over this checkout's folders (no torch)."""
    if "ebmfast.kernels" in sys.modules:
        return
    for name, path in (("ebmfast", ROOT / "ebmfast"), ("ebmfast.kernels", ROOT / "kernels")):
        mod = types.ModuleType(name)
        mod.__path__ = [str(path)]
        sys.modules[name] = mod


def _kernel_fn(job: dict):
    module = sys.modules.get(job["module"])
    if module is None:
        if job["module"].startswith("ebmfast."):
            _register_packages()
            module = importlib.import_module(job["module"])
        else:  # a generated kernel file (kernels/persistent.py's cache): imports ebmfast.kernels.* by name
            _register_packages()
            spec = importlib.util.spec_from_file_location(job["module"], job["file"])
            module = importlib.util.module_from_spec(spec)
            sys.modules[job["module"]] = module
            spec.loader.exec_module(module)
    return getattr(module, job["function"])


def run_job(job: dict) -> dict:
    """Compile one job with the installed Triton: {"triton", "ptxas" (``ptxas_report``), "sass", "shared", "ptx"}."""
    import triton

    kernel = _kernel_fn(job)
    compiled = _compile(kernel, job["signature"], job["constexprs"], job["num_warps"], job["capability"])
    ptx = compiled.asm["ptx"]
    arch = f"sm_{job['capability']}a" if job["capability"] >= 90 else f"sm_{job['capability']}"
    return {
        "triton": triton.__version__,
        "ptxas": ptxas_report(ptx, arch),
        "sass": disassemble(compiled.asm["cubin"]),
        "shared": int(compiled.metadata.shared),
        "ptx": ptx,
    }


def run_jobs(jobs: list[dict], python: str | None = None, timeout: float = 1800) -> list[dict]:
    """Compile jobs in a fresh process of ``python`` (default: this interpreter), with TRITON_INTERPRET unset and an
    empty Triton cache: a cached binary of the same source compiled from another checkout would carry that
    checkout's file paths in its line information."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "EBMFAST_TRITON_ON_CPU")}
    with tempfile.TemporaryDirectory(prefix="ebmfast-compile-") as cache:
        env["TRITON_CACHE_DIR"] = cache
        res = subprocess.run(
            [python or sys.executable, str(Path(__file__).resolve())],
            input=json.dumps(jobs),
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
        )
    if res.returncode != 0:
        raise RuntimeError(f"compile worker ({python or sys.executable}) failed: {res.stderr.strip()[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> int:
    """Worker: a JSON list of jobs on stdin, one JSON list of results on the last line of stdout."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("kernel_compile: TRITON_INTERPRET=1 is set; the compile needs the compiled Triton")
    jobs = json.loads(sys.stdin.read())
    print(json.dumps([run_job(job) for job in jobs]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
