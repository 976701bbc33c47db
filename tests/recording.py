"""Where a recorded run came from, so that tests can ask for bitwise equality only where it is promised.

float32 results on the CPU depend on more than the torch version: oneDNN and the vectorised kernels choose their
code by the processor's instruction set (AVX2, AVX-512, ...), and sums round differently with it. A recording is
compared bit for bit only on the same torch, architecture, vectorisation level and processor family/model; anywhere
else the tests compare within a relative tolerance instead."""

from __future__ import annotations

import platform
from pathlib import Path

import torch

# How far a float32 CPU result may move away from a recording made on another platform: two processors running the
# same old code agreed within this in every value recorded in tests/data (and forcing AVX2 kernels moves them ~1e-7).
TOLERANCE = {"rel": 1e-5, "abs": 1e-7}


def _cpuinfo() -> dict[str, str]:
    """vendor, family and model of the first processor in /proc/cpuinfo (empty where there is none)."""
    wanted = {"vendor_id": "vendor", "cpu family": "family", "model": "model"}
    found: dict[str, str] = {}
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return found
    for line in lines:
        key, _, value = line.partition(":")
        key = key.strip()
        if key in wanted and wanted[key] not in found:
            found[wanted[key]] = value.strip()
        if not line.strip() and found:  # the end of the first processor's block
            break
    return found


def platform_fingerprint() -> dict[str, object]:
    """What decides how float32 CPU arithmetic rounds here: torch, architecture, vectorisation, processor."""
    return {
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu": _cpuinfo(),
    }


def recorded_here(recorded: dict) -> bool:
    """True when ``recorded`` (a platform_fingerprint() stored with a recording) is this machine's."""
    return recorded == platform_fingerprint()
