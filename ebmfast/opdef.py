"""How ebmfast defines its torch custom ops, written once for every op module (``langevin``, ``buffer``, ``ops``).

- ``load_kernels(name)``: ``ebmfast.kernels.<name>`` (Triton), or None where it cannot be imported; the package
  imports and runs on CPU without Triton, and a CUDA call then raises a clear error (``triton_unavailable_reason``).
- ``define_op`` / ``wrap``: with compiled Triton the ops are ``torch.library.triton_op``s that torch.compile sees
  and inlines, their launches going through ``wrap_triton``. Without Triton, or under ``TRITON_INTERPRET=1`` (numpy
  interpreters that fake tensors cannot trace), they are plain ``custom_op``s, opaque to torch.compile, whose fake
  implementations each op module registers itself where ``USES_TRITON_OP`` is False.
- ``triton_on_cpu()``: the Triton kernels run on CPU tensors under the interpreter when ``TRITON_INTERPRET=1`` and
  ``EBMFAST_TRITON_ON_CPU=1`` (how the tests exercise them on a machine without a GPU).
"""

from __future__ import annotations

import os
from types import ModuleType

__all__ = [
    "HAS_TRITON",
    "USES_TRITON_OP",
    "define_op",
    "wrap",
    "load_kernels",
    "triton_on_cpu",
    "triton_unavailable_reason",
]

_IMPORT_ERRORS: dict[str, Exception] = {}


def load_kernels(name: str) -> ModuleType | None:
    """The Triton kernel module ``ebmfast.kernels.<name>``, or None where Triton (or that file) fails to import."""
    try:  # through __import__, so that an import hook that hides the kernels (tests/test_langevin.py) is honoured
        return __import__(f"ebmfast.kernels.{name}", fromlist=["__name__"])
    except Exception as exc:  # ImportError, or a broken Triton install
        _IMPORT_ERRORS[name] = exc
        return None


HAS_TRITON = load_kernels("langevin") is not None


def triton_unavailable_reason() -> str | None:
    """None where the Triton kernels import, else why not (and what to install)."""
    if HAS_TRITON:
        return None
    exc = _IMPORT_ERRORS["langevin"]
    return f"Triton could not be imported ({type(exc).__name__}: {exc}); pip install triton"


def triton_on_cpu() -> bool:
    """Whether the Triton kernels run on CPU tensors here (under the interpreter, tests only)."""
    return HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("EBMFAST_TRITON_ON_CPU") == "1"


USES_TRITON_OP = HAS_TRITON and os.environ.get("TRITON_INTERPRET") != "1"
if USES_TRITON_OP:
    from torch.library import triton_op as define_op
    from torch.library import wrap_triton as wrap
else:
    from torch.library import custom_op as define_op

    wrap = None
