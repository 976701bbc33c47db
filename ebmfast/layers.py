"""The layer program: a chain model's energy gradient and Langevin step on our own Triton kernels
(``kernels/layers.py``), for the sampler's ``"triton"`` backend.

Which models: whatever ``ebmfast.recognise`` reads (by what the forward computes, not by class) that
``kernel_chain`` can lower to the kernels: a Conv2d / Linear chain with one activation of ``KERNEL_ACTIVATIONS``
between two layers (parameters of LeakyReLU / ELU / Softplus as float32 bits), identity-shortcut residual adds
(``kernels.geometry.residual_reason`` says which), ending in Linear(k, 1) (or a Conv2d to one channel whose unpadded
kernel covers its input); batch norm and pooling arrive folded into the affine layers' weights (computed at each
call). ``ACT_CODES`` maps activation names to the kernels' codes; ``KERNEL_ACTIVATIONS`` / ``KERNEL_RESIDUAL`` say
what the kernels in this tree run (the one place to narrow or widen).

    program = layer_program(model, precision="fp32")        # cached per (model, precision)
    reason = unsupported_reason(model, x)                    # None, or why these kernels cannot run it
    g = program.energy_grad(x)                               # grad_x sum(-f(x)), no update
    program.step_(x, None, rng, SEED_STEP, noise_index=k + 1, add_noise=True)  # == langevin.step_(x, grad(x), ...)

A step is ``program.launches_per_step`` kernel launches (two per Conv2d/Linear before the final Linear(k, 1)), the
update being the epilogue of the last one. Parameters are read from the model at every call (in-place optimizer
updates are seen; a replaced parameter is used from the next call on). Scratch buffers (one per layer, fp32, the
layer's output per sample) are allocated once per (input shape, dtype, device) on the first call with that shape
(``program.prepare(x)`` does it ahead of a CUDA-graph capture) and kept until ``program.release()``; ``step_``
itself allocates nothing (but the folded weights of a model with batch norm or pooling), never synchronises with
the host and launches a fixed sequence for a given shape, so it can be captured (a captured graph should hold
``program.scratch(x)``). Programs are cached per (model, precision)
by ``layer_program``, so samplers on one model share the scratch: replay their graphs on one stream.

Runs on CUDA with Triton, and on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1`` with
``EBMFAST_TRITON_ON_CPU=1``: how the tests run it).
"""

from __future__ import annotations

import dataclasses
import functools
import weakref

import torch
from torch import nn

from . import ops
from .kernels.geometry import (
    PRECISIONS,
    LayerSpec,
    encode_geometry,
    float_bits,
    launches_per_step,
    residual_reason,
)
from .recognise import Act, Add, Affine, Program, Reshape, affine_tensors, recognise
from .reference import StepSettings

__all__ = [
    "LayerProgram",
    "layer_program",
    "unsupported_reason",
    "plan_layers",
    "kernel_chain",
    "chain_for",
    "run_reason",
    "ACT_CODES",
    "KERNEL_ACTIVATIONS",
    "KERNEL_RESIDUAL",
]

# The kernels' activation codes (kernels/geometry.py) by the names ``ebmfast.recognise`` gives activations.
ACT_CODES = {
    "identity": 0,
    "swish": 1,
    "tanh": 2,
    "relu": 3,
    "leaky_relu": 4,
    "elu": 5,
    "softplus": 6,
    "gelu": 7,
    "gelu_tanh": 8,
    "sigmoid": 9,
}
# What the kernels in this tree run: the ONE place to narrow or widen (every activation of ``ACT_CODES``; residual
# adds, within what ``kernels.geometry.residual_reason`` accepts).
KERNEL_ACTIVATIONS = frozenset(ACT_CODES)
KERNEL_RESIDUAL = True
# Activations with a parameter (``recognise``'s ``Act.param``), carried as float32 bits in ``*_act_param``.
_PARAM_ACTIVATIONS = frozenset({"leaky_relu", "elu", "softplus"})


@dataclasses.dataclass(frozen=True)
class KernelChain:
    """A recognised program as the kernels run it: its affine layers in order, one ``LayerSpec`` each, and the
    residual sources."""

    program: Program
    affine: tuple[Affine, ...]
    specs: tuple[LayerSpec, ...]
    residual: tuple[int, ...]  # per layer k: j when the input of layer j is added to z_k (``LayerSpec.res_src``), or -1


def _act_fields(prefix: str, act: tuple[str, float]) -> dict:
    """A LayerSpec's activation fields for ``act`` = (name, parameter); the parameter travels as float32 bits in
    ``<prefix>_act_param`` (0 for activations without one)."""
    param = float_bits(act[1]) if act[0] in _PARAM_ACTIVATIONS else 0
    return {f"{prefix}_act": ACT_CODES[act[0]], f"{prefix}_act_param": param}


def _map_shape(program: Program, v: int) -> tuple[int, ...]:
    """The per-sample map behind value ``v`` (reshapes looked through): what the kernels store."""
    while v > 0 and isinstance(program.nodes[v - 1], Reshape):
        v = program.nodes[v - 1].src
    return program.shapes[v]


def _as_dense(node: Affine) -> bool:
    """Whether ``node`` runs as a dense layer: a Linear, or a Conv2d whose unpadded kernel covers its whole input map
    (one output position; its (O, C, kh, kw) weight is a Linear's (O, C*H*W) in NCHW flatten order, e.g. the 4x4
    conv to one channel that ends the short-run-MCMC nets)."""
    if not node.conv:
        return True
    return node.padding == (0, 0) and node.kernel == tuple(node.in_shape[1:]) and node.out_shape[1:] == (1, 1)


@functools.lru_cache(maxsize=256)
def kernel_chain(program: Program) -> KernelChain | str:
    """``program`` as a chain of the layer kernels, or the reason the kernels cannot run it: a chain of Conv2d /
    Linear layers with at most one activation (of ``KERNEL_ACTIVATIONS``) between two of them, reshapes only in front
    of a Linear or at the output, ending in Linear(k, 1) (or its conv form, ``_as_dense``); with ``KERNEL_RESIDUAL``,
    residual adds z_k + h_j right after layer k of the input h_j of an earlier layer j (identity shortcuts) where
    ``kernels.geometry.residual_reason`` accepts them (otherwise its reason is returned: never an error at launch)."""
    affine: list[Affine] = []
    acts: list[tuple[str, float]] = []
    res: list[int] = []  # per affine layer k: j when the input of layer j is added to z_k, else -1
    pending: tuple[str, float] | None = None
    reshaped = False
    for i, node in enumerate(program.nodes, start=1):
        if isinstance(node, Add):
            if not KERNEL_RESIDUAL:
                return "a residual add (y = x + g(x)): the layer kernels in this tree have no residual add"
            if not isinstance(program.nodes[i - 2], Affine) or i - 1 not in (node.a, node.b) or res[-1] >= 0:
                return "a residual add must directly follow a Conv2d/Linear (before its activation), once"
            skip = node.b if node.a == i - 1 else node.a
            sources = [j for j, layer in enumerate(affine) if layer.src == skip]
            if not sources:
                return (
                    "a residual add of a value that is not the input of an earlier Conv2d/Linear (a projection "
                    "shortcut) is not run by the layer kernels"
                )
            res[-1] = sources[0]
            continue
        if node.src != i - 1:
            return f"value v{node.src} feeds more than one layer: the layer kernels run a plain chain"
        if isinstance(node, Reshape):
            reshaped = True
        elif isinstance(node, Act):
            if not affine:
                return f"an activation ({node.name}) before the first Conv2d/Linear is not supported"
            if pending is not None:
                return (
                    f"two activations in a row ({pending[0]}, then {node.name}) are not supported: the kernels fuse "
                    "one activation between two layers"
                )
            if node.name not in KERNEL_ACTIVATIONS:
                return (
                    f"the activation {node.name} is not run by the layer kernels in this tree (they run "
                    f"{', '.join(sorted(KERNEL_ACTIVATIONS))})"
                )
            pending = (node.name, node.param)
        else:
            if affine:
                acts.append(pending or ("identity", 0.0))
            pending = None
            if node.conv and reshaped:
                return "a Conv2d after Flatten / a reshape (or on a 2-D input) is not supported"
            if node.conv and len(node.in_shape) != 3:
                return f"a Conv2d on a per-sample shape {node.in_shape} is not supported"
            affine.append(node)
            res.append(-1)
            reshaped = False
    if pending is not None:
        return f"an activation ({pending[0]}) after the final Linear(k, 1) is not supported"
    acts.append(("identity", 0.0))
    if not (_as_dense(affine[-1]) and affine[-1].out_shape[0] == 1):
        return "the chain must end in a Linear(k, 1) (one score per sample)"
    if len(affine) < 2:
        return "the chain needs at least one Conv2d/Linear before the final Linear(k, 1)"
    specs = []
    for idx, node in enumerate(affine):
        shape = _map_shape(program, node.src)
        c, h, w = shape if len(shape) == 3 else (shape[0] if shape else 1, 1, 1)
        if len(shape) not in (1, 3):
            return f"inputs must be (N, C, H, W) or (N, D), got a per-sample shape {shape}"
        common = dict(
            **_act_fields("in", acts[idx - 1] if idx else ("identity", 0.0)),
            **_act_fields("out", acts[idx]),
            has_bias=int(node.bias is not None or node.bn is not None),
            in_nchw=int(idx == 0),
            res_src=res[idx],
        )
        if node.conv and not _as_dense(node):
            c_out, oh, ow = node.out_shape
            (kh, kw), (sh, sw), (ph, pw) = node.kernel, node.stride, node.padding
            specs.append(LayerSpec(0, c, h, w, c_out, oh, ow, kh, kw, sh, sw, ph, pw, **common))
        else:
            specs.append(LayerSpec(1, c, h, w, node.out_shape[0], 1, 1, h, w, 1, 1, 0, 0, **common))
    reason = residual_reason(specs)
    if reason is not None:
        return f"a residual add the layer kernels do not run: {reason}"
    return KernelChain(program, tuple(affine), tuple(specs), tuple(res))


def chain_for(model: nn.Module, x: torch.Tensor) -> KernelChain | str:
    """The kernel chain of ``model`` on inputs like ``x`` (recognised by ``ebmfast.recognise``), or why not."""
    found = recognise(model, x)
    return found if isinstance(found, str) else kernel_chain(found)


def plan_layers(model: nn.Module, sample_shape: tuple[int, ...]) -> list[LayerSpec] | str:
    """The layer specs for inputs of shape (N, *sample_shape), or the reason they cannot run."""
    p = next(iter(model.parameters()), None)
    probe = torch.zeros((2, *(int(v) for v in sample_shape)), device=p.device if p is not None else "cpu")
    found = chain_for(model, probe)
    return found if isinstance(found, str) else list(found.specs)


def unsupported_reason(model: nn.Module, x: torch.Tensor, precision: str = "fp32") -> str | None:
    """Why ``model`` on inputs like ``x`` cannot run on the layer kernels (None if it can): not recognised, not a chain
    the kernels run, shapes, dtypes, devices, or no Triton / no CUDA (outside the CPU interpreter)."""
    if precision not in PRECISIONS:
        return f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}"
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        return "x must be a batch tensor (N, C, H, W) or (N, D)"
    reason = _tensor_reason(model, x)
    if reason is not None:
        return reason
    found = chain_for(model, x)
    if isinstance(found, str):
        return found
    return run_reason(found, model, x) or ops.layer_kernels_unavailable_reason(x.device)


def run_reason(chain: KernelChain, model: nn.Module, x: torch.Tensor) -> str | None:
    """Why the kernels cannot run ``chain`` (recognised from ``model``) on ``x`` now: dtypes, devices, a batch beyond
    32-bit indexing (None if they can). Shared by the layer and persistent programs' plans."""
    reason = _tensor_reason(model, x)
    if reason is not None:
        return reason
    if x.shape[0] * max(s.d_out for s in chain.specs[:-1]) >= 2**31 or x.numel() >= 2**31:
        return "batch too large: more than 2**31 elements in one layer's activation"
    return None


def _tensor_reason(model: nn.Module, x: torch.Tensor) -> str | None:
    # The model's own tensors, not the effective ones: reading a parametrized weight outside sampling mode would run
    # its parametrization (spectral norm's power iteration updates buffers).
    if x.dtype != torch.float32:
        return f"the chain state must be float32, got {x.dtype}"
    for name, t in (*model.named_parameters(), *model.named_buffers()):
        if t.is_floating_point() and t.dtype != torch.float32:
            return f"parameters must be float32, {name} is {t.dtype}"
        if t.device != x.device:
            return f"x is on {x.device} but the model's parameters are on {t.device}"
    return None


class _Plan:
    """Geometry and scratch for one (recognised chain, input shape, dtype, device)."""

    def __init__(self, chain: KernelChain, x: torch.Tensor) -> None:
        self.chain = chain
        self.specs = list(chain.specs)
        self.geometry = encode_geometry(self.specs)
        batch = x.shape[0]
        self.scratch = [torch.empty(batch * s.d_out, dtype=torch.float32, device=x.device) for s in self.specs[:-1]]


class KernelProgram:
    """What the kernel programs (``LayerProgram`` here, ``ebmfast.persistent.PersistentProgram``) share: the model
    (held weakly by the cached programs, so the cache stays weak), the precision, the per-shape plans, and the
    parameters read at each call. The model is recognised per call (``ebmfast.recognise``: cached, re-captured
    when its structure changes).
    Subclasses set ``WHAT`` (for messages) and build their own plans (``_plan``)."""

    WHAT = "the layer kernels"

    def __init__(self, model: nn.Module, precision: str = "fp32", *, weak: bool = False) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
        # ``weak``: the per-model caches hold their programs as values of a weak-keyed dict, which must not keep
        # their own key alive; a program made directly keeps its model.
        self._model = weakref.ref(model) if weak else (lambda: model)
        self.precision = precision
        self._prec = PRECISIONS[precision]
        self._plans: dict = {}
        self._last: KernelChain | None = None
        shape = getattr(model, "input_shape", None)
        if shape is not None:  # a model that states its input shape is checked now
            p = next(iter(model.parameters()), None)
            self._chain(torch.zeros((2, *shape), device=p.device if p is not None else "cpu"))

    def _chain(self, x: torch.Tensor) -> KernelChain:
        model = self._model()
        if model is None:
            raise RuntimeError(f"{self.WHAT}: the model of this program no longer exists")
        found = chain_for(model, x)
        if isinstance(found, str):
            raise ValueError(f"{self.WHAT} cannot run this model on x {tuple(x.shape)}: {found}")
        self._last = found
        return found

    def _plan(self, x: torch.Tensor) -> object:
        raise NotImplementedError

    def specs(self, x: torch.Tensor) -> list[LayerSpec]:
        return list(self._plan(x).specs)

    def release(self) -> None:
        """Drop every plan and its scratch (plans are otherwise kept for the program's life: nothing is evicted
        behind a captured graph's back). Graphs captured before must hold ``scratch(x)`` themselves."""
        self._plans.clear()

    def _params(self, chain: KernelChain) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The effective weights and biases (pooling and batch norm folded), read from the live model now:
        replaced parameters and in-place updates are both seen."""
        tensors = chain.program.read(self._model())
        weights, biases = [], []
        for node in chain.affine:
            w, b = affine_tensors(node, tensors)
            weights.append(w)
            biases.append(b if b is not None else w)  # stand-in, never read
        return weights, biases

    def _op_args(self, x: torch.Tensor) -> tuple[object, tuple]:
        """The plan for ``x`` and the program's part of every kernel op's arguments, in the order their schemas
        take it: ``(weights, biases, scratch, geometry, precision)``."""
        plan = self._plan(x)
        weights, biases = self._params(plan.chain)
        return plan, (weights, biases, plan.scratch, plan.geometry, self._prec)


class LayerProgram(KernelProgram):
    """One model's energy gradient on the layer kernels, in one precision ("fp32", "tf32" or "bf16")."""

    @property
    def launches_per_step(self) -> int:
        """Kernel launches of one ``step_`` (or ``energy_grad``) of the chain last planned (or, for a model with an
        ``input_shape``, checked at construction): forward and input gradient of every layer before the final
        Linear(k, 1) (which needs neither), one fewer when the layer before it is a Linear with at most
        ``HEAD_MAX_OUT`` outputs (the fused head). Seed CNN: 4 convs x 2 + 1 = 9 (``kernels.geometry.
        launches_per_step``)."""
        if self._last is None:
            raise ValueError("launches_per_step needs a planned input shape: call prepare(x) first")
        return launches_per_step(self._last.specs)

    def _plan(self, x: torch.Tensor) -> _Plan:
        chain = self._chain(x)
        key = (chain.program, tuple(x.shape), x.dtype, x.device)
        plan = self._plans.get(key)
        if plan is None:
            reason = run_reason(chain, self._model(), x)
            if reason is not None:
                raise ValueError(f"the layer kernels cannot run this model on x {tuple(x.shape)}: {reason}")
            reason = ops.layer_kernels_unavailable_reason(x.device)
            if reason is not None:
                raise RuntimeError(reason)
            plan = self._plans[key] = _Plan(chain, x)
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
        _, args = self._op_args(x)
        return torch.ops.ebmfast.layers_energy_grad(x, *args)

    def step_(
        self,
        x: torch.Tensor,
        g: None,
        rng: torch.Tensor,
        settings: StepSettings,
        *,
        noise_index: int,
        add_noise: bool,
        z: torch.Tensor | None = None,
    ) -> None:
        """One step tail in place on ``x``: x <- clamp(x - step_size * clamp(grad(x), +-grad_clip), lo, hi), then
        (``add_noise``) x <- clamp(x + noise_std * z, lo, hi) with ``z`` given or drawn from the stream at
        ``rng[1] + noise_index``. Same as ``langevin.step_(x, grad(x), rng, settings, ...)``; ``g`` must be None (the
        gradient is formed inside the kernels; the argument keeps ``langevin.step_``'s call shape)."""
        if g is not None:
            raise ValueError("LayerProgram.step_ forms the gradient itself: pass g=None")
        ops.check_step_args(x, None, z, rng)
        _, args = self._op_args(x)
        torch.ops.ebmfast.layers_step_(
            x,
            z if add_noise else None,
            rng,
            *args,
            *settings.op_args(),
            int(noise_index),
            bool(add_noise),
        )


_PROGRAMS: weakref.WeakKeyDictionary[nn.Module, dict] = weakref.WeakKeyDictionary()


def layer_program(model: nn.Module, precision: str = "fp32") -> LayerProgram:
    """The (cached) layer program of ``model`` in ``precision``: every sampler on one model shares its scratch."""
    per_model = _PROGRAMS.setdefault(model, {})
    if precision not in per_model:
        per_model[precision] = LayerProgram(model, precision, weak=True)
    return per_model[precision]
