"""pytest plugin for the GPU check (``-p gpu_test_selection`` with ``bench/`` on the path): deselects every test case
parametrized to run on the CPU (a ``device`` parameter, fixture or argument, equal to ``"cpu"``). Such cases belong
to the CPU suite (CI); on a CUDA machine the kernels' CPU cases would need the Triton interpreter, which the GPU
check does not enable, so selecting them by marker (``device`` also marks them) could only fail."""

from __future__ import annotations


def _on_cpu(item) -> bool:
    callspec = getattr(item, "callspec", None)
    if callspec is None:
        return False
    return any(str(v) == "cpu" for k, v in callspec.params.items() if k == "device")


def pytest_collection_modifyitems(config, items):
    drop = [item for item in items if _on_cpu(item)]
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = [item for item in items if not _on_cpu(item)]
