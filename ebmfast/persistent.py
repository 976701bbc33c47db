"""The persistent chain program: a whole K-step Langevin chain of a layer-chain model in one kernel launch
(``kernels/persistent.py``), for the sampler's ``"persistent"`` backend.

    program = persistent_program(model, precision="fp32")   # cached per (model, precision)
    reason = unsupported_reason(model, x)                    # None, or why the persistent kernel cannot run it
    program.chain_(x, rng, steps, SEED_STEP)                 # an ebmfast.reference.StepSettings
    rng[1] += steps                                          # the caller advances the stream, as for every backend

``chain_`` runs on contiguous ``x`` in place exactly what ``ebmfast.chain.run_chain_`` runs with the layer program's
steps (head noise draw 0, then K tails: gradient step, clamp, next draw, clamp), in one launch
(``launches_per_chain == 1``): draws j = 0 .. K-1 at stream position ``rng[1] + j`` (or ``noise[j]``), the final state
in ``x``, and with ``trajectory`` (a (K, *x.shape) fp32 tensor) the state after each step. It never reads anything
back to the host and allocates nothing once planned, so a CUDA graph can capture it as it is; the graph must hold
``program.scratch(x)`` (and the noise / trajectory tensors it was captured with).

Parameters are read from the model at every call (in-place optimizer updates are seen; a replaced parameter is used
from the next call on, or by the next graph capture). The scratch (one fp32 buffer, ``settings.programs`` regions of
``block`` samples' activations) is allocated once per (input shape, dtype, device) on the first call
(``prepare(x)`` does it ahead of a capture) and kept until ``release()``. Programs are cached per (model, precision)
by ``persistent_program``, so samplers on one model share the scratch: replay their graphs on one stream.

Runs on CUDA with Triton, and on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1`` with
``EBMFAST_TRITON_ON_CPU=1``: how the tests run it).
"""

from __future__ import annotations

import weakref
from types import ModuleType
from typing import TYPE_CHECKING

import torch
from torch import nn

from . import ops
from .kernels.geometry import LayerSpec, encode_geometry
from .layers import KernelChain, KernelProgram, chain_for, run_reason
from .layers import unsupported_reason as _layers_reason
from .reference import StepSettings

if TYPE_CHECKING:
    from .kernels.persistent import ChainSettings

__all__ = ["PersistentProgram", "persistent_program", "unsupported_reason"]


def _kernels() -> ModuleType:
    if ops.persistent_kernels is None:
        raise RuntimeError(ops.persistent_unavailable_reason("cpu") or "kernels/persistent.py is unavailable")
    return ops.persistent_kernels


def _scratch_reason(specs: list[LayerSpec]) -> str | None:
    if ops.persistent_kernels is None:
        return None  # the device check says why nothing runs
    return ops.persistent_kernels.scratch_reason(specs)


def unsupported_reason(model: nn.Module, x: torch.Tensor, precision: str = "fp32") -> str | None:
    """Why ``model`` on inputs like ``x`` cannot run as one persistent kernel (None if it can): every reason of the
    layer kernels (``ebmfast.layers.unsupported_reason``: not a chain, layers, shapes, dtypes, devices, no Triton /
    no CUDA), or one sample's activations beyond the per-program scratch budget."""
    reason = _layers_reason(model, x, precision)
    if reason is not None:
        return reason
    return _scratch_reason(list(chain_for(model, x).specs)) or ops.persistent_unavailable_reason(x.device)


class _Plan:
    """Geometry, launch settings and scratch for one (input shape, dtype, device)."""

    def __init__(self, chain: KernelChain, x: torch.Tensor, settings: ChainSettings) -> None:
        kernels = _kernels()
        self.chain = chain
        self.specs = specs = list(chain.specs)
        self.geometry = encode_geometry(specs)
        self.settings = settings
        self.settings_list = settings.encode()
        per_program = kernels.scratch_layout(specs, settings.block)[1]
        self.scratch = torch.empty(settings.programs * per_program, dtype=torch.float32, device=x.device)


class PersistentProgram(KernelProgram):
    """One model's whole Langevin chain as one persistent kernel, in one precision ("fp32", "tf32" or "bf16")."""

    WHAT = "the persistent kernel"
    launches_per_chain = 1  # head noise, K steps and every layer inside one launch

    def _plan(self, x: torch.Tensor, settings: ChainSettings | None = None) -> _Plan:
        chain = self._chain(x)
        key = (chain.program, tuple(x.shape), x.dtype, x.device)
        plan = self._plans.get(key)
        if plan is None or (settings is not None and settings != plan.settings):
            reason = run_reason(chain, self._model(), x)
            if reason is not None:
                raise ValueError(f"the persistent kernel cannot run this model on x {tuple(x.shape)}: {reason}")
            specs = list(chain.specs)
            reason = _scratch_reason(specs)
            if reason is not None:
                raise ValueError(f"the persistent kernel cannot run this model on x {tuple(x.shape)}: {reason}")
            reason = ops.persistent_unavailable_reason(x.device)
            if reason is not None:
                raise RuntimeError(reason)
            if settings is None:
                sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else None
                settings = _kernels().chain_settings(specs, x.shape[0], sm_count=sms)
            plan = self._plans[key] = _Plan(chain, x, settings)
        return plan

    def prepare(self, x: torch.Tensor, settings: ChainSettings | None = None) -> None:
        """Plan and allocate the scratch for inputs like ``x`` now (e.g. before a CUDA-graph capture). ``settings``
        (a ``kernels.persistent.ChainSettings``) replaces the default launch settings for this shape (benchmarks)."""
        self._plan(x, settings)

    def settings(self, x: torch.Tensor) -> ChainSettings:
        """The ``ChainSettings`` (samples per program, warps, programs, tiles) used for inputs like ``x``."""
        return self._plan(x).settings

    def scratch(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The scratch the chain uses for inputs like ``x`` (planned now if needed). A CUDA graph captured over
        ``chain_`` bakes its address in: keep this list with the graph so it outlives it."""
        return [self._plan(x).scratch]

    def chain_(
        self,
        x: torch.Tensor,
        rng: torch.Tensor,
        steps: int,
        settings: StepSettings,
        *,
        noise: torch.Tensor | None = None,
        trajectory: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """A whole K-step chain on ``x`` in place, in one launch: draw 0, then ``steps`` fused steps (draws at
        ``rng[1] + j``, or ``noise[j]``, j < steps). ``trajectory``: a contiguous fp32 (steps, *x.shape) tensor that
        receives the state after each step. Does not advance ``rng``. Returns ``x``."""
        steps = int(steps)
        if steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps}")
        ops.check_step_args(x, None, None, rng)
        for name, t in (("noise", noise), ("trajectory", trajectory)):
            if t is not None and (
                tuple(t.shape) != (steps, *x.shape)
                or t.device != x.device
                or t.dtype != torch.float32
                or not t.is_contiguous()
            ):
                raise ValueError(
                    f"{name} must be a contiguous float32 tensor of shape (steps, *x.shape) = {(steps, *x.shape)} on "
                    f"{x.device}, got {tuple(t.shape)} {t.dtype} on {t.device}"
                )
        plan, args = self._op_args(x)
        torch.ops.ebmfast.persistent_chain_(
            x,
            noise,
            trajectory,
            rng,
            *args,
            plan.settings_list,
            steps,
            *settings.op_args(),
        )
        return x


_PROGRAMS: weakref.WeakKeyDictionary[nn.Module, dict] = weakref.WeakKeyDictionary()


def persistent_program(model: nn.Module, precision: str = "fp32") -> PersistentProgram:
    """The (cached) persistent program of ``model`` in ``precision``: every sampler on one model shares its
    scratch."""
    per_model = _PROGRAMS.setdefault(model, {})
    if precision not in per_model:
        per_model[precision] = PersistentProgram(model, precision, weak=True)
    return per_model[precision]
