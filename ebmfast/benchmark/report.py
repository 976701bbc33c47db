"""How ``ebmfast bench`` reports: the environment recorded with every result, the tables, and the long-format
CSV history (one measurement per row, in the style of Liger-Kernel's benchmark history)."""

from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import platform
from collections.abc import Callable
from typing import Any

import torch

from .throughput import DistributedSamplerResult, SamplerResult
from .training import TrainResult

__all__ = [
    "environment",
    "fmt",
    "format_table",
    "format_train_table",
    "format_distributed_table",
    "CSV_FIELDS",
    "csv_rows",
    "check_csv_history",
    "write_csv_history",
]


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    """Versions and device facts recorded with every result."""
    from .. import __version__

    env = {
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "ebmfast": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": None,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "device": str(device),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:
        pass
    try:  # shapes compiled after the first are dynamic by default (and remembered across processes by PGO)
        import torch._dynamo.config as dcfg

        env["dynamo_automatic_dynamic_shapes"] = getattr(dcfg, "automatic_dynamic_shapes", None)
        env["dynamo_automatic_dynamic_local_pgo"] = getattr(dcfg, "automatic_dynamic_local_pgo", None)
    except Exception:
        pass
    if device.type == "cuda":
        from .telemetry import device_info

        props = torch.cuda.get_device_properties(device)
        env["device_name"] = props.name
        env["sm_count"] = props.multi_processor_count
        env["capability"] = f"{props.major}.{props.minor}"
        env["gpu_memory_gib"] = props.total_memory / 2**30
        env["nvml"] = device_info(device.index if device.index is not None else torch.cuda.current_device())
        env["driver"] = env["nvml"].get("driver")
    else:
        env["device_name"] = env["cpu"]
    return env


def fmt(v, spec: str, none: str = "n/a") -> str:
    return none if v is None else format(v, spec)


def _table(head: str, results: list, key: Callable[[Any], str], row: Callable[[Any], str]) -> str:
    """``head``, a rule, then a line per result: ``key(r)`` (the columns that name the measurement) and ``row(r)``
    (its figures), or ``key(r)`` and why it was skipped."""
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(f"{key(r)}   skipped: {r.skipped}" if r.skipped else f"{key(r)} {row(r)}")
    return "\n".join(lines)


def _column_table(results: list, columns: tuple) -> str:
    """A table of results named by backend, batch and steps, then right-aligned figure columns (title, width,
    value): ``value`` is an attribute name or a function of the result, and a format spec (``fmt``)."""

    def key(r: SamplerResult | TrainResult) -> str:
        return f"{r.backend:<10} {r.batch:>6} {r.steps:>5}"

    def cell(r: SamplerResult | TrainResult, value: str | Callable, spec: str) -> str:
        return fmt(getattr(r, value, None) if isinstance(value, str) else value(r), spec)

    head = f"{'backend':<10} {'batch':>6} {'steps':>5}" + "".join(f" {title:>{w}}" for title, w, _, _ in columns)
    return _table(head, results, key, lambda r: " ".join(f"{cell(r, v, spec):>{w}}" for _, w, v, spec in columns))


def _scaled(v: float | None, factor: float) -> float | None:
    return None if v is None else v * factor


def _memory(r: SamplerResult) -> str:
    if r.peak_mem_mb is not None and not r.device.startswith("cuda"):
        return f"rss+{r.peak_mem_mb:.0f}"  # CPU: resident-set growth, not an allocator peak
    return fmt(r.peak_mem_mb, ".1f")


SAMPLER_COLUMNS = (
    ("sample-steps/s", 15, "sample_steps_per_s", ",.0f"),
    ("x eager", 8, "ratio_to_eager", ".2f"),
    ("ms/chain", 10, "ms_per_chain", ".2f"),
    ("TFLOP/s", 8, "tflops", ".3f"),
    ("%fp32pk", 8, lambda r: _scaled(r.frac_fp32_peak, 100), ".1f"),
    ("%tf32pk", 8, lambda r: _scaled(r.frac_tf32_peak, 100), ".1f"),
    ("peak MB", 9, _memory, ""),
    ("first s", 8, "first_call_s", ".2f"),
)
TRAIN_COLUMNS = (
    ("CD it/s", 9, "iters_per_s", ".2f"),
    ("x eager", 8, "ratio_to_eager", ".2f"),
    ("ms/it", 9, lambda r: _scaled(r.median_s, 1e3), ".1f"),
    ("chain ms", 9, lambda r: _scaled(getattr(r, "chain_median_s", None), 1e3), ".1f"),
    ("it/chain", 9, "iter_over_chain", ".2f"),
    ("60 ep (min)", 12, "projected_60_epochs_min", ".1f"),
    ("first s", 8, "first_iter_s", ".2f"),
)


def format_table(results: list[SamplerResult]) -> str:
    return _column_table(results, SAMPLER_COLUMNS)


def format_train_table(results: list[TrainResult]) -> str:
    return _column_table(results, TRAIN_COLUMNS)


def format_distributed_table(results: list[DistributedSamplerResult]) -> str:
    head = (
        f"{'backend':<10} {'batch/rank':>10} {'steps':>5} {'ranks':>5} {'aggregate sample-steps/s':>25} "
        f"{'slowest ms/call':>16}  per-rank sample-steps/s"
    )

    def key(r: DistributedSamplerResult) -> str:
        return f"{r.backend:<10} {r.batch:>10} {r.steps:>5} {r.world_size:>5}"

    def row(r: DistributedSamplerResult) -> str:
        per_rank = ", ".join(f"r{i} {v:,.0f}" for i, v in enumerate(r.rank_sample_steps_per_s))
        agg = fmt(r.aggregate_sample_steps_per_s, ",.0f")
        return f"{agg:>25} {fmt(r.slowest_ms_per_call, '.2f'):>16}  {per_rank}"

    return _table(head, results, key, row)


CSV_FIELDS = (
    "kernel",
    "provider",
    "metric",
    "unit",
    "x_name",
    "x_value",
    "y_50",
    "y_20",
    "y_80",
    "extra_benchmark_config_str",
    "device_name",
    "timestamp",
    "ebmfast_version",
    "torch_version",
    "triton_version",
)


def csv_rows(env: dict, sampler: list[SamplerResult], train: list[TrainResult], precision: str) -> list[dict]:
    """Long-format rows (one measurement per row), in the style of Liger-Kernel's benchmark history."""
    common = {
        "device_name": env.get("device_name"),
        "timestamp": env.get("time"),
        "ebmfast_version": env.get("ebmfast"),
        "torch_version": env.get("torch"),
        "triton_version": env.get("triton"),
    }
    rows = []
    for r in sampler:
        if r.skipped or r.median_s is None:
            continue
        base = _csv_base(common, "langevin_sample", r, precision, "rounds")
        n = r.batch * r.steps
        rows.append(_csv_row(base, "throughput", "sample-steps/s", n / r.median_s, n / r.q80_s, n / r.q20_s))
        rows.append(_csv_row(base, "time", "ms", r.median_s * 1e3, r.q20_s * 1e3, r.q80_s * 1e3))
        rows.append(_csv_row(base, "first_call", "s", r.first_call_s))
        if r.peak_mem_mb is not None:
            unit = "MB" if r.device.startswith("cuda") else "MB (RSS growth)"
            rows.append(_csv_row(base, "memory", unit, r.peak_mem_mb))
    for r in train:
        if r.skipped or r.median_s is None:
            continue
        base = _csv_base(common, "cd_iteration", r, precision, "iters")
        rows.append(_csv_row(base, "throughput", "iterations/s", 1 / r.median_s, 1 / r.q80_s, 1 / r.q20_s))
        if getattr(r, "chain_median_s", None):
            rows.append(_csv_row(base, "iteration_over_chain", "ratio", r.iter_over_chain))
    return rows


def _csv_base(common: dict, kernel: str, r: SamplerResult | TrainResult, precision: str, count: str) -> dict:
    """The columns every row of one measurement shares (``count``: what its number of timings is called)."""
    cfg = json.dumps({"steps": r.steps, "precision": precision, "timer": r.timer, count: len(r.times_s)})
    return dict(
        common, kernel=kernel, provider=r.backend, x_name="batch", x_value=r.batch, extra_benchmark_config_str=cfg
    )


def _csv_row(base: dict, metric: str, unit: str, y_50: float | None, *quantiles: float) -> dict:
    """One row: the median and the 20th/80th percentiles (``quantiles``), or one value for all three."""
    y_20, y_80 = quantiles or (y_50, y_50)
    return dict(base, metric=metric, unit=unit, y_50=y_50, y_20=y_20, y_80=y_80)


def check_csv_history(path) -> bool:
    """True when ``path`` is new or empty (a header is due); ``ValueError`` when it holds another CSV's columns."""
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return True
    with open(path, newline="") as fh:
        header = next(csv.reader(fh), None)
    if header != list(CSV_FIELDS):
        raise ValueError(f"{path} exists with columns {header}, expected {list(CSV_FIELDS)}: use a new file")
    return False


def write_csv_history(path: str, rows: list[dict]) -> None:
    """Append ``rows`` to the CSV at ``path`` (header written when the file is new or empty)."""
    new = check_csv_history(path)
    with open(path, "a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k) for k in CSV_FIELDS})
