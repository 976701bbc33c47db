"""GPU telemetry through nvidia-ml-py (``pynvml``), sampled in a background thread during a measurement.

Static facts: device name, driver version, total memory. Sampled series: SM clock (MHz), power (W), memory used
(MiB), temperature (C). On a CPU-only machine, without ``pynvml``, or when NVML cannot start, ``Telemetry`` is a
no-op whose ``available`` is False and whose ``reason`` says why; nothing raises.

    with Telemetry(device_index=0) as tel:
        run_benchmark()
    tel.summary()   # {"sm_clock_mhz": {"min":..., "median":..., "max":...}, ...}
"""

from __future__ import annotations

import statistics
import threading
import time

__all__ = ["Telemetry", "device_info"]

METRICS = ("sm_clock_mhz", "power_w", "memory_used_mib", "temperature_c")


def _load_nvml():
    """The pynvml module, initialised; or (None, reason)."""
    try:
        import pynvml  # provided by the nvidia-ml-py package
    except Exception as exc:  # ImportError, or a broken install
        return None, f"pynvml not importable ({type(exc).__name__}: {exc}); pip install nvidia-ml-py"
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # NVMLError_LibraryNotFound / DriverNotLoaded on CPU-only machines
        return None, f"NVML could not start ({type(exc).__name__}: {exc})"
    return pynvml, None


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _nvml_index(device_index: int) -> int:
    """NVML numbers devices by PCI order; CUDA by CUDA_VISIBLE_DEVICES order. Map through the visible list."""
    import os

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        parts = [p.strip() for p in visible.split(",") if p.strip()]
        if device_index < len(parts) and parts[device_index].isdigit():
            return int(parts[device_index])
    return device_index


def device_info(device_index: int = 0) -> dict:
    """Static facts about GPU ``device_index`` through NVML: {"available": bool, "name", "driver", ...}."""
    nvml, reason = _load_nvml()
    if nvml is None:
        return {"available": False, "reason": reason}
    try:
        h = nvml.nvmlDeviceGetHandleByIndex(_nvml_index(device_index))
        info = {
            "available": True,
            "name": _text(nvml.nvmlDeviceGetName(h)),
            "driver": _text(nvml.nvmlSystemGetDriverVersion()),
            "memory_total_mib": nvml.nvmlDeviceGetMemoryInfo(h).total / 2**20,
        }
        for key, fn in (
            ("sm_clock_max_mhz", lambda: nvml.nvmlDeviceGetMaxClockInfo(h, nvml.NVML_CLOCK_SM)),
            ("power_limit_w", lambda: nvml.nvmlDeviceGetEnforcedPowerLimit(h) / 1000.0),
        ):
            try:
                info[key] = fn()
            except Exception:  # not every field is supported on every device / virtualisation layer
                info[key] = None
        return info
    except Exception as exc:
        return {"available": False, "reason": f"NVML query failed ({type(exc).__name__}: {exc})"}
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:
            pass


class Telemetry:
    """Context manager sampling NVML every ``interval_s`` seconds in a daemon thread."""

    def __init__(self, device_index: int = 0, interval_s: float = 0.05, enabled: bool = True):
        self.device_index = int(device_index)
        self.interval_s = float(interval_s)
        self.samples: dict[str, list[float]] = {m: [] for m in METRICS}
        self.info: dict = {}
        self.available = False
        self.reason: str | None = "disabled" if not enabled else None
        self._enabled = enabled
        self._nvml = None
        self._handle = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.duration_s = 0.0

    def _read(self) -> None:
        nvml, h = self._nvml, self._handle
        readers = (
            ("sm_clock_mhz", lambda: float(nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_SM))),
            ("power_w", lambda: nvml.nvmlDeviceGetPowerUsage(h) / 1000.0),
            ("memory_used_mib", lambda: nvml.nvmlDeviceGetMemoryInfo(h).used / 2**20),
            ("temperature_c", lambda: float(nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU))),
        )
        for name, fn in readers:
            try:
                self.samples[name].append(float(fn()))
            except Exception:  # an unsupported field stays empty; the others continue
                pass

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._read()
            self._stop.wait(self.interval_s)

    def __enter__(self) -> Telemetry:
        self._t0 = time.perf_counter()
        if not self._enabled:
            return self
        nvml, reason = _load_nvml()
        if nvml is None:
            self.reason = reason
            return self
        try:
            self._handle = nvml.nvmlDeviceGetHandleByIndex(_nvml_index(self.device_index))
            self.info = {
                "name": _text(nvml.nvmlDeviceGetName(self._handle)),
                "driver": _text(nvml.nvmlSystemGetDriverVersion()),
            }
        except Exception as exc:
            self.reason = f"NVML device {self.device_index} not usable ({type(exc).__name__}: {exc})"
            try:
                nvml.nvmlShutdown()
            except Exception:
                pass
            return self
        self._nvml = nvml
        self.available = True
        self._read()  # at least one sample even for very short measurements
        self._thread = threading.Thread(target=self._loop, name="ebmfast-telemetry", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.duration_s = time.perf_counter() - self._t0
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=5 * self.interval_s + 1.0)
            self._thread = None
        if self._nvml is not None:
            self._read()
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                pass
            self._nvml = None

    def summary(self) -> dict:
        """{"available": bool, "reason"?, "name", "driver", "n_samples", metric: {"min", "median", "max"}}."""
        out: dict = {"available": self.available}
        if not self.available:
            out["reason"] = self.reason
            return out
        out.update(self.info)
        out["n_samples"] = max((len(v) for v in self.samples.values()), default=0)
        for name, values in self.samples.items():
            if values:
                out[name] = {"min": min(values), "median": statistics.median(values), "max": max(values)}
            else:
                out[name] = None
        return out
