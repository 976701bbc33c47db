"""How ``backend="auto"`` chooses: on CPU between the compiled gradient and eager autograd, on CUDA among the graph and
kernel backends; always by measurement.

On CPU (``time_cpu``, ``choose_cpu``), for a model ``ebmfast.recognise`` does not read (a recognised one always gets the
compiled chain program, untimed): at the sampler's first call for a model structure and input shape, the compiled
gradient is called once (the compile, timed and reported apart), then compiled and eager gradients are timed in
interleaved rounds (``CPU_ROUNDS`` each); ``compiled`` is kept unless it measured below ``CPU_MIN_RATIO`` of eager's
speed, or compiled no graph at all (``energy_grad.runs_uncompiled``). The choice is cached by the sampler per shape,
dtype, precision and model structure; ``sampler.explain(x)`` gives the times.

On CUDA: the fastest *measured* backend for this GPU, model and batch size.

Where the measurements come from, in this order:
1. the user's timing cache, written by ``tune(sampler, x)`` (or by ``auto`` itself when
   ``EBMFAST_AUTOTUNE=1``): one JSON file (``$EBMFAST_CACHE_DIR/autotune.json``, default
   ``~/.cache/ebmfast/autotune.json``) holding, per GPU name, torch/triton versions, model architecture, sample shape,
   batch size and precision, the measured time per Langevin step of each candidate backend;
2. the table committed with the package (``ebmfast/backend_table.json``), filled from GPU check runs
   (``bench/device_check.sh``), looked up by GPU name, architecture, precision and the nearest measured batch size;
3. otherwise ``graph``, the backend the project has measured longest.

A candidate other than ``graph`` is picked only when it measured faster than ``graph`` in the same timing, so
``auto`` never picks something slower than ``graph``. Candidates the model cannot run (see ``explain``) are left out.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:  # the sampler imports this module when it chooses; at run time tune() imports the sampler late
    from .sampler import LangevinSampler

__all__ = ["architecture_key", "choose", "choose_cpu", "time_cpu", "tune", "record", "cache_path", "TABLE_PATH"]

CPU_ROUNDS = 2  # timed gradients per candidate when auto chooses on CPU (after the compile)
CPU_MIN_RATIO = 0.95  # auto on CPU keeps compiled while it times at least this fraction of eager's speed

TABLE_PATH = Path(__file__).with_name("backend_table.json")


def cache_path() -> Path:
    root = os.environ.get("EBMFAST_CACHE_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "ebmfast"
    return base / "autotune.json"


def architecture_key(model: nn.Module) -> str:
    """A short name for the model's architecture: class names, layer settings and parameter shapes (not values)."""
    parts = [type(model).__name__]
    for name, module in model.named_modules():
        extra = module.extra_repr() if hasattr(module, "extra_repr") else ""
        parts.append(f"{name}:{type(module).__name__}({extra})")
    parts += [f"{n}{tuple(p.shape)}" for n, p in model.named_parameters()]
    digest = hashlib.sha1("|".join(parts).encode()).hexdigest()[:12]
    return f"{type(model).__name__}-{digest}"


def _gpu(device: torch.device) -> str:
    return torch.cuda.get_device_name(device)


def _versions() -> str:
    try:
        import triton

        tv = triton.__version__
    except Exception:
        tv = "none"
    return f"torch {torch.__version__}, triton {tv}"


def _entry_key(model: nn.Module, x: torch.Tensor, precision: str) -> str:
    return " | ".join(
        [
            _gpu(x.device),
            _versions(),
            architecture_key(model),
            "x".join(map(str, x.shape[1:])),
            str(x.dtype).removeprefix("torch."),
            f"batch {x.shape[0]}",
            precision,
        ]
    )


def _load(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _fastest(times: dict[str, float], allowed: list[str]) -> str | None:
    """The fastest allowed candidate, but only if it beat ``graph`` in the same measurement."""
    usable = {b: t for b, t in times.items() if b in allowed and isinstance(t, (int, float)) and math.isfinite(t)}
    if "graph" not in usable:
        return None
    best = min(usable, key=lambda b: (usable[b], allowed.index(b)))
    return best if usable[best] < usable["graph"] else "graph"


def _from_table(model: nn.Module, x: torch.Tensor, precision: str, allowed: list[str]) -> str | None:
    rows = _load(TABLE_PATH).get("rows", [])
    gpu, arch = _gpu(x.device), architecture_key(model)
    shape = list(x.shape[1:])
    mine = [
        r
        for r in rows
        if r.get("gpu") == gpu
        and r.get("architecture") == arch
        and r.get("sample_shape") == shape
        and r.get("precision") == precision
    ]
    if not mine:
        return None
    batch = x.shape[0]
    nearest = min(mine, key=lambda r: abs(math.log(max(1, r["batch"])) - math.log(batch)))
    return _fastest(nearest.get("us_per_step", {}), allowed)


def choose(
    model: nn.Module,
    x: torch.Tensor,
    precision: str,
    allowed: list[str],
    tuner: Callable[[], dict[str, float]] | None = None,
) -> tuple[str, str]:
    """(backend, where the choice came from) for CUDA input ``x``; ``allowed``: the candidates the model can run, in
    order of preference on a tie. ``tuner``: times the candidates now (``tune``), used when
    ``EBMFAST_AUTOTUNE=1`` and the cache has nothing for this entry."""
    cached = _load(cache_path()).get(_entry_key(model, x, precision))
    if cached:
        pick = _fastest(cached, allowed)
        if pick is not None:
            return pick, f"timing cache {cache_path()}"
    if os.environ.get("EBMFAST_AUTOTUNE") == "1" and tuner is not None and len(allowed) > 1:
        pick = _fastest(tuner(), allowed)
        if pick is not None:
            return pick, "timed now (EBMFAST_AUTOTUNE=1)"
    pick = _from_table(model, x, precision, allowed)
    if pick is not None:
        return pick, f"committed table {TABLE_PATH.name}"
    return "graph", "default (no measurement for this GPU, model and batch)"


def time_cpu(
    grads: dict[str, Callable[[torch.Tensor], torch.Tensor]],
    x: torch.Tensor,
    rounds: int = CPU_ROUNDS,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    """Seconds per gradient of each of ``grads`` (name -> g(x)) on ``x``: the fastest of ``rounds`` calls, the
    candidates interleaved (order rotated each round); a first call of ``compiled`` before the rounds is its compile,
    returned as ``"compile_s"``. A candidate that raises measures ``inf`` and its error is returned under
    ``"<name> error"`` (as a string)."""
    times: dict = {name: math.inf for name in grads}
    names = list(grads)
    failed: set[str] = set()

    def call(name: str) -> float:
        t0 = clock()
        try:
            grads[name](x)
        except Exception as exc:  # the candidate loses; auto keeps the other
            failed.add(name)
            times[f"{name} error"] = f"{type(exc).__name__}: {exc}"
        return clock() - t0

    if "compiled" in grads:
        times["compile_s"] = call("compiled")
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            if name not in failed:
                times[name] = min(times[name], call(name))
    for name in failed:
        times[name] = math.inf
    return times


def choose_cpu(times: dict, uncompiled: bool = False) -> tuple[str, str]:
    """(backend, why) from ``time_cpu``'s times: ``compiled`` unless it measured below ``CPU_MIN_RATIO`` of eager's
    speed (a tie within the timing's noise keeps the compiled gradient, the one measured faster on the project's
    models).
    ``uncompiled``: the compiled gradient compiled nothing (``energy_grad.runs_uncompiled``): ``eager`` whatever the
    times (they would differ by noise only)."""
    compiled, eager = times["compiled"], times["eager"]
    backend = "compiled" if CPU_MIN_RATIO * compiled <= eager and not uncompiled else "eager"
    why = (
        f"auto on cpu: timed once for this model structure and shape, {1e3 * compiled:.2f} ms per gradient compiled "
        f"vs {1e3 * eager:.2f} ms eager (compile {times.get('compile_s', math.nan):.1f} s, not counted)"
    )
    if uncompiled:
        why += (
            "; dynamo compiled no graph of the gradient (a graph break inside torch.func.grad, e.g. data-dependent"
            " control flow), so it runs eagerly"
        )
    if "compiled error" in times:
        why += f"; the compiled gradient failed: {times['compiled error']}"
    return backend, why


def record(model: nn.Module, x: torch.Tensor, precision: str, times: dict[str, float]) -> None:
    """Remember measured microseconds per step of each backend for this GPU, model, batch and precision in the
    timing cache that ``choose`` reads first. A read-only home is not an error: the times are just not kept."""
    path = cache_path()
    data = _load(path)
    data[_entry_key(model, x, precision)] = times
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        tmp.replace(path)
    except OSError:
        pass


def tune(
    sampler: LangevinSampler,
    x: torch.Tensor,
    backends: Sequence[str] | None = None,
    reps: int = 5,
    save: bool = True,
) -> dict[str, float]:
    """Time CUDA backends (default: ``graph`` and the kernel backends) on ``sampler``'s model, settings, precision
    and step count with a batch like ``x`` (CUDA events, median of ``reps`` chains after a warm-up that compiles and
    captures); returns microseconds per Langevin step, a backend that fails as ``inf``; with ``save`` the times go to
    the timing cache that ``backend="auto"`` reads first (``record``)."""
    from .sampler import KERNEL_BACKENDS, LangevinSampler

    if x.device.type != "cuda":
        raise ValueError(f"tune() measures CUDA backends; x is on {x.device}")
    backends = list(backends) if backends is not None else ["graph", *KERNEL_BACKENDS]
    times: dict[str, float] = {}
    for backend in backends:
        try:
            same = dict(sampler.settings.sampler_kwargs(), steps=sampler.steps, precision=sampler.precision)
            candidate = LangevinSampler(sampler.model, backend=backend, seed=0, check_finite=False, **same)
            candidate.sample(x)  # compile, capture
            runs = []
            for _ in range(reps):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                candidate.sample(x)
                end.record()
                end.synchronize()
                runs.append(start.elapsed_time(end) * 1e3 / sampler.steps)
            times[backend] = sorted(runs)[len(runs) // 2]
        except Exception:  # a backend that cannot run here loses; it does not stop the timing
            times[backend] = float("inf")
        finally:
            candidate = None
            torch.cuda.empty_cache()
    if save:
        record(sampler.model, x, sampler.precision, times)
    return times
