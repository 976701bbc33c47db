"""The layer program: a chain model's energy gradient and Langevin step on our own Triton kernels
(``kernels/layers.py``), for the sampler's ``"triton"`` backend.

    program = layer_program(model, precision="fp32")        # cached per (model, precision)
    reason = unsupported_reason(model, x)                    # None, or why these kernels cannot run it
    g = program.energy_grad(x)                               # grad_x sum(-f(x)), no update
    program.step_(x, None, rng, noise_index=k + 1, add_noise=True, step_size=10.0, grad_clip=0.03,
                  noise_std=0.005, lo=-1.0, hi=1.0)           # == ops.fused_step_(x, grad(x), rng, ...)

A step is ``program.launches_per_step`` kernel launches (two per Conv2d/Linear before the final Linear(k, 1)), the
update being the epilogue of the last one. Parameters are read from the model at every call (in-place optimizer
updates are seen; a replaced parameter is used from the next call on). Scratch buffers (one per layer, fp32, the
layer's output per sample) are allocated once per (input shape, dtype, device) on the first call with that shape
(``program.prepare(x)`` does it ahead of a CUDA-graph capture) and kept until ``program.release()``; ``step_``
itself allocates nothing, never synchronises with the host and launches a fixed sequence for a given shape, so it
can be captured (a captured graph should hold ``program.scratch(x)``). Programs are cached per (model, precision)
by ``layer_program``, so samplers on one model share the scratch: replay their graphs on one stream.

Runs on CUDA with Triton, and on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1`` with
``EBMFAST_TRITON_ON_CPU=1``: how the tests run it).
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from . import ops
from .energy_grad import chain_layers
from .kernels.geometry import (
    ACT_NAMES,
    ACT_NONE,
    ACT_SWISH,
    ACT_TANH,
    HEAD_MAX_OUT,
    PRECISIONS,
    LayerSpec,
    encode_geometry,
)
from .models import CNNModel, Swish

__all__ = ["LayerProgram", "layer_program", "unsupported_reason", "plan_layers"]

_ACTS = ((Swish, ACT_SWISH), (nn.SiLU, ACT_SWISH), (nn.Tanh, ACT_TANH))


def _act_code(layer: nn.Module) -> int | None:
    for cls, code in _ACTS:
        if isinstance(layer, cls):
            return code
    return None


def _chain(model: nn.Module) -> list[nn.Module] | str:
    layers = chain_layers(model)
    if layers is None:
        return (
            f"{type(model).__name__} is not a supported layer chain (CNNModel, or nn.Sequential of Conv2d "
            "(groups 1, dilation 1, zero padding) / Linear / Flatten / Swish / SiLU / Tanh / Identity ending in "
            "Linear(k, 1))"
        )
    return layers


def _structure(layers: list[nn.Module]) -> tuple[list[nn.Module], list[int]] | str:
    """The affine layers (Conv2d / Linear, final Linear(k, 1) last) and the activation code after each, or the reason
    the chain is not one these kernels run. Shape-independent checks only."""
    affine: list[nn.Module] = []
    acts: list[int] = []
    pending: int | None = None
    for layer in layers:
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            if affine:
                acts.append(ACT_NONE if pending is None else pending)
            pending = None
            affine.append(layer)
        elif isinstance(layer, (nn.Flatten, nn.Identity)):
            continue
        else:
            code = _act_code(layer)
            if not affine:
                return f"an activation ({type(layer).__name__}) before the first Conv2d/Linear is not supported"
            if pending is not None:
                return (
                    f"two activations in a row ({ACT_NAMES[pending]}, then {type(layer).__name__}) are not "
                    "supported: the kernels fuse one activation between two layers"
                )
            pending = code
    acts.append(ACT_NONE)  # nothing follows the final Linear(k, 1) (chain_layers ends there)
    if len(affine) < 2:
        return "the chain needs at least one Conv2d/Linear before the final Linear(k, 1)"
    for layer in affine:
        if layer.weight.dtype != torch.float32:
            return f"parameters must be float32, {type(layer).__name__} has {layer.weight.dtype}"
        if not layer.weight.is_contiguous():
            return f"{type(layer).__name__}.weight must be contiguous (the kernels index it in torch's layout)"
    return affine, acts


def _fixed_input_shape(model: nn.Module) -> tuple[int, ...] | None:
    return tuple(model.input_shape) if type(model) is CNNModel else None


def plan_layers(model: nn.Module, sample_shape: tuple[int, ...]) -> list[LayerSpec] | str:
    """The layer specs for inputs of shape (N, *sample_shape), or the reason they cannot run."""
    layers = _chain(model)
    if isinstance(layers, str):
        return layers
    return _plan(layers, tuple(int(v) for v in sample_shape), _fixed_input_shape(model))


def _plan(
    layers: list[nn.Module], sample_shape: tuple[int, ...], fixed: tuple[int, ...] | None
) -> list[LayerSpec] | str:
    found = _structure(layers)
    if isinstance(found, str):
        return found
    _, acts = found
    if fixed is not None and sample_shape != fixed:
        return f"CNNModel takes inputs (N, {', '.join(map(str, fixed))}), got (N, {sample_shape})"
    if len(sample_shape) == 3:
        shape: tuple[int, ...] = sample_shape  # (C, H, W) map
    elif len(sample_shape) == 1:
        shape = (sample_shape[0], 1, 1)
    else:
        return f"inputs must be (N, C, H, W) or (N, D), got {len(sample_shape) + 1}-D (N, {sample_shape})"
    flat = len(sample_shape) == 1
    specs: list[LayerSpec] = []
    idx = 0
    for layer in layers:
        if isinstance(layer, nn.Flatten):
            flat = True
            continue
        if not isinstance(layer, (nn.Conv2d, nn.Linear)):
            continue
        c, h, w = shape
        in_act = acts[idx - 1] if idx else ACT_NONE
        out_act = acts[idx]
        common = dict(in_act=in_act, out_act=out_act, has_bias=int(layer.bias is not None), in_nchw=int(idx == 0))
        if isinstance(layer, nn.Conv2d):
            if flat:
                return "a Conv2d after Flatten (or on a 2-D input) is not supported"
            if layer.in_channels != c:
                return f"Conv2d expects {layer.in_channels} input channels, the activation has {c}"
            (kh, kw), (sh, sw), (ph, pw) = layer.kernel_size, layer.stride, layer.padding
            oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
            if oh < 1 or ow < 1:
                return f"Conv2d {kh}x{kw} (padding {ph}x{pw}) does not fit a {h}x{w} input"
            spec = LayerSpec(0, c, h, w, layer.out_channels, oh, ow, kh, kw, sh, sw, ph, pw, **common)
            shape = (layer.out_channels, oh, ow)
        else:
            if not flat and (h, w) != (1, 1):
                return f"a Linear on a 4-D activation {(c, h, w)} is not supported (insert nn.Flatten())"
            if layer.in_features != c * h * w:
                return f"Linear expects {layer.in_features} input features, the activation has {c * h * w}"
            spec = LayerSpec(1, c, h, w, layer.out_features, 1, 1, h, w, 1, 1, 0, 0, **common)
            shape = (layer.out_features, 1, 1)
        specs.append(spec)
        idx += 1
    return specs


def unsupported_reason(model: nn.Module, x: torch.Tensor, precision: str = "fp32") -> str | None:
    """Why ``model`` on inputs like ``x`` cannot run on the layer kernels (None if it can): not a chain, an unsupported
    layer or arrangement, shapes, dtypes, devices, or no Triton / no CUDA (outside the CPU interpreter)."""
    if precision not in PRECISIONS:
        return f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}"
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        return "x must be a batch tensor (N, C, H, W) or (N, D)"
    layers = _chain(model)
    if isinstance(layers, str):
        return layers
    return _reason(layers, _fixed_input_shape(model), x) or ops.layer_kernels_unavailable_reason(x.device)


def _reason(layers: list[nn.Module], fixed: tuple[int, ...] | None, x: torch.Tensor) -> str | None:
    if x.dtype != torch.float32:
        return f"the chain state must be float32, got {x.dtype}"
    specs = _plan(layers, tuple(x.shape[1:]), fixed)
    if isinstance(specs, str):
        return specs
    for layer in layers:
        for p in layer.parameters():
            if p.device != x.device:
                return f"x is on {x.device} but the model's parameters are on {p.device}"
    if x.shape[0] * max(s.d_out for s in specs[:-1]) >= 2**31 or x.numel() >= 2**31:
        return "batch too large: more than 2**31 elements in one layer's activation"
    return None


class _Plan:
    """Geometry and scratch for one (input shape, dtype, device)."""

    def __init__(self, specs: list[LayerSpec], x: torch.Tensor) -> None:
        self.specs = specs
        self.geometry = encode_geometry(specs)
        batch = x.shape[0]
        self.scratch = [torch.empty(batch * s.d_out, dtype=torch.float32, device=x.device) for s in specs[:-1]]


class KernelProgram:
    """What the kernel programs (``LayerProgram`` here, ``ebmfast.persistent.PersistentProgram``) share: the model's
    chain checked once, its affine layers, the precision, the per-shape plans, and the parameters read at each call.
    Subclasses set ``WHAT`` (for messages) and build their own plans (``_plan``)."""

    WHAT = "the layer kernels"

    def __init__(self, model: nn.Module, precision: str = "fp32") -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
        layers = _chain(model)
        found = _structure(layers) if not isinstance(layers, str) else layers
        if isinstance(found, str):
            raise ValueError(f"{self.WHAT} cannot run this model: {found}")
        self._layers = layers  # the model's own submodules (no reference to the model: the cache stays weak)
        self._fixed = _fixed_input_shape(model)
        self._affine = found[0]
        self.precision = precision
        self._prec = PRECISIONS[precision]
        self._plans: dict = {}

    def _plan(self, x: torch.Tensor) -> _Plan:
        raise NotImplementedError

    def specs(self, x: torch.Tensor) -> list[LayerSpec]:
        return list(self._plan(x).specs)

    def release(self) -> None:
        """Drop every plan and its scratch (plans are otherwise kept for the program's life: nothing is evicted
        behind a captured graph's back). Graphs captured before must hold ``scratch(x)`` themselves."""
        self._plans.clear()

    def _params(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        weights, biases = [], []
        for layer in self._affine:  # read now: replaced parameters and in-place updates are both seen
            w = layer.weight.detach()
            if not w.is_contiguous():
                raise ValueError(f"{type(layer).__name__}.weight must be contiguous for {self.WHAT}")
            weights.append(w)
            biases.append(layer.bias.detach() if layer.bias is not None else w)  # stand-in, never read
        return weights, biases


class LayerProgram(KernelProgram):
    """One model's energy gradient on the layer kernels, in one precision ("fp32", "tf32" or "bf16")."""

    @property
    def launches_per_step(self) -> int:
        """Kernel launches of one ``step_`` (or ``energy_grad``): forward and input gradient of every layer before
        the final Linear(k, 1) (which needs neither), one fewer when the layer before it is a Linear with at most
        ``HEAD_MAX_OUT`` outputs (the fused head). Seed CNN: 4 convs x 2 + 1 = 9. Same as
        ``kernels.geometry.launches_per_step(specs)``."""
        head = self._affine[-2]
        fused = isinstance(head, nn.Linear) and head.out_features <= HEAD_MAX_OUT
        return 2 * (len(self._affine) - 1) - int(fused)

    def _plan(self, x: torch.Tensor) -> _Plan:
        key = (tuple(x.shape), x.dtype, x.device)
        plan = self._plans.get(key)
        if plan is None:
            reason = _reason(self._layers, self._fixed, x)
            if reason is not None:
                raise ValueError(f"the layer kernels cannot run this model on x {tuple(x.shape)}: {reason}")
            reason = ops.layer_kernels_unavailable_reason(x.device)
            if reason is not None:
                raise RuntimeError(reason)
            plan = self._plans[key] = _Plan(_plan(self._layers, tuple(x.shape[1:]), self._fixed), x)
        return plan

    def prepare(self, x: torch.Tensor) -> None:
        """Plan and allocate the scratch for inputs like ``x`` now (e.g. before a CUDA-graph capture)."""
        self._plan(x)

    def scratch(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The scratch buffers ``step_`` uses for inputs like ``x`` (planned now if needed). A CUDA graph captured
        over ``step_`` bakes their addresses in: keep this list with the graph so they outlive it."""
        return list(self._plan(x).scratch)

    def energy_grad(self, x: torch.Tensor) -> torch.Tensor:
        """g = grad_x sum(-f(x)), shaped like x (contiguous)."""
        if not x.is_contiguous():
            raise ValueError("x must be contiguous (NCHW or (N, D))")
        plan = self._plan(x)
        weights, biases = self._params()
        return torch.ops.ebmfast.layers_energy_grad(x, weights, biases, plan.scratch, plan.geometry, self._prec)

    def step_(
        self,
        x: torch.Tensor,
        g: None,
        rng: torch.Tensor,
        *,
        noise_index: int,
        add_noise: bool,
        z: torch.Tensor | None = None,
        step_size: float,
        grad_clip: float,
        noise_std: float,
        lo: float,
        hi: float,
    ) -> None:
        """One step tail in place on ``x``: x <- clamp(x - step_size * clamp(grad(x), +-grad_clip), lo, hi), then
        (``add_noise``) x <- clamp(x + noise_std * z, lo, hi) with ``z`` given or drawn from the stream at
        ``rng[1] + noise_index``. Same as ``ops.fused_step_(x, grad(x), rng, ...)``; ``g`` must be None (the
        gradient is formed inside the kernels; the argument keeps ``fused_step_``'s call shape)."""
        if g is not None:
            raise ValueError("LayerProgram.step_ forms the gradient itself: pass g=None")
        ops._check_step_args(x, None, z, rng)
        plan = self._plan(x)
        weights, biases = self._params()
        torch.ops.ebmfast.layers_step_(
            x,
            z if add_noise else None,
            rng,
            weights,
            biases,
            plan.scratch,
            plan.geometry,
            self._prec,
            float(step_size),
            float(grad_clip),
            float(noise_std),
            float(lo),
            float(hi),
            int(noise_index),
            bool(add_noise),
        )

    def chain_(
        self,
        x: torch.Tensor,
        rng: torch.Tensor,
        steps: int,
        *,
        step_size: float,
        grad_clip: float,
        noise_std: float,
        lo: float,
        hi: float,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """A whole K-step chain on ``x`` in place: ``ebmfast.chain.run_chain_`` with this program's steps; draws
        k = 0 .. steps-1 at ``rng[1] + k`` (or ``noise[k]``). Does not advance ``rng``. Returns ``x``."""
        from .chain import LayerStepper, StepSettings, run_chain_

        settings = StepSettings(step_size, grad_clip, noise_std, lo, hi)
        return run_chain_(x, steps, rng, LayerStepper(self, settings), noise)[0]


_PROGRAMS: weakref.WeakKeyDictionary[nn.Module, dict] = weakref.WeakKeyDictionary()


def layer_program(model: nn.Module, precision: str = "fp32") -> LayerProgram:
    """The (cached) layer program of ``model`` in ``precision``: every sampler on one model shares its scratch."""
    per_model = _PROGRAMS.setdefault(model, {})
    if precision not in per_model:
        per_model[precision] = LayerProgram(model, precision)
    return per_model[precision]
