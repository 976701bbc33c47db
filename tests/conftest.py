"""Shared test setup.

On a machine without CUDA, Triton kernels run under the numpy interpreter (TRITON_INTERPRET=1, read when the
kernels are decorated, so it is set before anything imports them). Tests marked ``cuda`` are skipped there with a
reason; on a CUDA machine they run.
"""

import os

# Idle OpenMP threads sleep instead of spinning: with torch's 2 threads on a 2-core machine, spinning threads of one
# process (a test's subprocess, a neighbour job) stall the other's parallel regions 10-50x on the small ops here.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; run bench/device_check.sh on a GPU machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    yield


def assert_close_verbose(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float = 0.0, what: str = ""):
    """allclose with a report: how many elements differ, the worst ones, NaN/inf mismatches."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    nan_mismatch = (a.isnan() != e.isnan()).sum().item()
    diff = (a - e).abs().nan_to_num(0.0)
    bad = diff > atol + rtol * e.abs()
    if nan_mismatch or bad.any():
        idx = bad.nonzero()[:5].tolist()
        worst = diff.max().item()
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{a.numel()} elements differ beyond atol={atol}, rtol={rtol}; "
            f"max abs diff {worst:.3e}; NaN mismatches {nan_mismatch}; first bad indices {idx}"
        )
