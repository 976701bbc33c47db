"""Run records: ``metrics.csv`` (long format), TensorBoard scalars and images, and a plain-text ``train.log``.

``metrics.csv`` has one row per (step, metric): ``step,epoch,metric,value,wall_time``. Long format, so metrics that
appear later (validation, callbacks, divergence events) need no header change; load it with
``csv.DictReader`` or ``pandas.read_csv(...).pivot_table(index="step", columns="metric", values="value")``.

A new run (no ``purge_step``) starts ``metrics.csv`` afresh. On resume, ``truncate_after(step)`` drops rows written
after the checkpoint's step (they belong to the part of the run being replayed), and TensorBoard is opened with
``purge_step`` for the same reason.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import time
from pathlib import Path

from ..errors import require

__all__ = ["MetricsLogger", "read_metrics", "RunLog"]

CSV_FIELDS = ("step", "epoch", "metric", "value", "wall_time")


class MetricsLogger:
    """Writes scalars to ``out_dir/metrics.csv`` and (optionally) ``out_dir/tb``; ``out_dir=None`` keeps them only
    in memory (``latest``)."""

    def __init__(self, out_dir: str | os.PathLike | None, tensorboard: bool = True, purge_step: int | None = None):
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.latest: dict[str, float] = {}
        self._csv = None
        self._writer = None
        self._tb = None
        self._rows_since_flush = 0
        if self.out_dir is None:
            return
        summary_writer = None
        if tensorboard:  # checked before any file is written
            purpose = "TensorBoard logging (TrainConfig.tensorboard; ebmfast train --no-tensorboard turns it off)"
            summary_writer = require("torch.utils.tensorboard", purpose, package="tensorboard").SummaryWriter
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / "metrics.csv"
        if purge_step is not None:
            self.truncate_after(purge_step)
            new = not path.exists() or path.stat().st_size == 0
        else:  # a new run: whatever an earlier (killed or overwritten) run left there is not part of it
            new = True
        self._csv = open(path, "w" if new else "a", newline="", encoding="utf-8")
        self._writer = csv.writer(self._csv)
        if new:
            self._writer.writerow(CSV_FIELDS)
        if summary_writer is not None:
            # a new run also hides an earlier run's TensorBoard events (purge from step 0)
            self._tb = summary_writer(str(self.out_dir / "tb"), purge_step=0 if purge_step is None else purge_step)

    def truncate_after(self, step: int) -> None:
        """Drop rows of metrics.csv with a step greater than ``step`` (atomically rewritten)."""
        path = self.out_dir / "metrics.csv"
        if not path.exists():
            return
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.reader(fh))
        if not rows:
            return
        header, body = rows[0], rows[1:]
        keep = [r for r in body if r and _int_or_none(r[0]) is not None and _int_or_none(r[0]) <= step]
        if len(keep) == len(body):
            return
        tmp = path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(header)
            w.writerows(keep)
        os.replace(tmp, path)

    def log(self, step: int, epoch: int, metrics: dict[str, float]) -> None:
        now = time.time()
        for name, value in metrics.items():
            value = float(value)
            self.latest[name] = value
            if self._writer is not None:
                self._writer.writerow((step, epoch, name, repr(value), f"{now:.3f}"))
                self._rows_since_flush += 1
            if self._tb is not None and math.isfinite(value):
                self._tb.add_scalar(name, value, step)
        if self._csv is not None:
            self._csv.flush()  # one write per call: others (and a crash) see every finished step
        if self._rows_since_flush >= 500:
            self.flush()

    def image(self, tag: str, grid, step: int) -> None:
        """A (3, H, W) image in [0, 1] to TensorBoard."""
        if self._tb is not None:
            self._tb.add_image(tag, grid, step)

    def flush(self) -> None:
        if self._csv is not None:
            self._csv.flush()
            self._rows_since_flush = 0
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        self.flush()
        if self._csv is not None:
            self._csv.close()
            self._csv = self._writer = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _int_or_none(text: str):
    try:
        return int(text)
    except ValueError:
        return None


def read_metrics(path: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """``metrics.csv`` as ``{metric: [(step, value), ...]}`` in file order."""
    out: dict[str, list[tuple[int, float]]] = {}
    with open(path, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            out.setdefault(row["metric"], []).append((int(row["step"]), float(row["value"])))
    return out


class RunLog:
    """The run's text log: timestamped lines appended to ``out_dir/train.log`` (none when ``out_dir`` is None), and
    the same messages through the ``ebmfast.train`` logger so that an application's logging setup sees them."""

    def __init__(self, out_dir: str | os.PathLike | None, name: str = "ebmfast.train"):
        self.logger = logging.getLogger(name)
        if not any(isinstance(h, logging.NullHandler) for h in self.logger.handlers):
            self.logger.addHandler(logging.NullHandler())  # a library does not print unless the app asks
        self._fh = None
        if out_dir is not None:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            self._fh = open(Path(out_dir) / "train.log", "a", encoding="utf-8")

    def _write(self, level: str, msg: str) -> None:
        if self._fh is not None:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            self._fh.write(f"{stamp} {level} {msg}\n")
            self._fh.flush()

    def info(self, msg: str) -> None:
        self._write("INFO", msg)
        self.logger.info(msg)

    def warning(self, msg: str) -> None:
        self._write("WARNING", msg)
        self.logger.warning(msg)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
