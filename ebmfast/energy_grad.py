"""The energy gradient g = grad_x sum(-f(x)): one model forward plus the input-gradient backward.

Two builders:
- ``eager``: autograd (what the reference does).
- ``compiled``: ``torch.compile`` of a gradient program. For models ``ebmfast.recognise`` reads (convolutions, linear
  layers, the activations of ``recognise.ACTIVATIONS``, reshapes, residual adds, with batch norm and average / global
  mean pooling folded into the affine layers), the program is the chain rule written out (``program_energy_grad``:
  forward keeping what the backward needs, then conv_transpose / matmul / elementwise derivative back to the input);
  only the input gradient is formed, never weight gradients. One compiled program per recognised structure. Any other
  model goes through ``torch.func.grad`` over ``functional_call``; ``recognise(model, x)`` (and
  ``sampler.explain(x)``) says why. Either way parameters are read at call time, so in-place optimizer updates and
  replaced parameters are seen.
  The generic program is compiled with the convolution input gradient decomposed into the transposed convolution it
  is (``conv_input_grad``), like the chain program, instead of the full convolution backward kernel.
  On CPU, 4-D inputs are run channels-last (oneDNN's strided conv_transpose is several times faster that way).
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .recognise import ACTIVATIONS, Act, Add, Affine, Program, Reshape, affine_tensors, recognise

__all__ = [
    "eager_energy_grad",
    "compiled_energy_grad",
    "program_energy_grad",
    "activation",
    "conv_input_grad",
    "compile_generic",
    "runs_uncompiled",
]

EnergyGrad = Callable[[torch.Tensor], torch.Tensor]


def eager_energy_grad(model: nn.Module) -> EnergyGrad:
    from .reference import energy_grad_reference

    return lambda x: energy_grad_reference(model, x)


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def activation(name: str, param: float, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(act(a), act'(a)) for an activation of ``recognise.ACTIVATIONS``."""
    if name == "identity":
        return a, torch.ones_like(a)
    if name == "swish":
        s = torch.sigmoid(a)
        return a * s, s * (1.0 + a * (1.0 - s))
    if name == "tanh":
        y = torch.tanh(a)
        return y, 1.0 - y * y
    if name == "sigmoid":
        y = torch.sigmoid(a)
        return y, y * (1.0 - y)
    if name == "relu":
        pos = a > 0
        return torch.relu(a), pos.to(a.dtype)
    if name == "leaky_relu":
        pos = a > 0
        return F.leaky_relu(a, param), torch.where(pos, torch.ones_like(a), torch.full_like(a, param))
    if name == "elu":
        y = F.elu(a, param)
        return y, torch.where(a > 0, torch.ones_like(a), y + param)
    if name == "softplus":
        ba = a * param
        return F.softplus(a, param), torch.where(ba > 20.0, torch.ones_like(a), torch.sigmoid(ba))
    if name == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(a * (1.0 / math.sqrt(2.0))))
        return a * cdf, cdf + a * torch.exp(-0.5 * a * a) * (1.0 / math.sqrt(2.0 * math.pi))
    if name == "gelu_tanh":
        t = torch.tanh(_SQRT_2_OVER_PI * (a + 0.044715 * a * a * a))
        y = 0.5 * a * (1.0 + t)
        return y, 0.5 * (1.0 + t) + 0.5 * a * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * a * a)
    raise ValueError(f"unknown activation {name!r}; expected one of {ACTIVATIONS}")


def program_energy_grad(program: Program, tensors: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """grad_x sum(-f(x)) for a recognised ``Program`` (``ebmfast.recognise``) by the chain rule written out, no
    autograd: a forward keeping what the backward needs, then conv_transpose / matmul / elementwise derivatives back
    to the input, gradients of a value used twice (residual blocks) summed. ``tensors``: ``program.read(model)``."""
    n = x.shape[0]
    vals: list[torch.Tensor] = [x]
    keep: list[object] = []
    params = []
    for node in program.nodes:
        h = vals[node.a] if isinstance(node, Add) else vals[node.src]
        if isinstance(node, Affine):
            w, b = affine_tensors(node, tensors)
            params.append(w)
            if node.conv:
                out = F.conv2d(h, w, b, node.stride, node.padding)
            else:
                out = F.linear(h.reshape(n, -1), w, b)
            keep.append(None)
        elif isinstance(node, Act):
            out, d = activation(node.name, node.param, h)
            keep.append(d)
        elif isinstance(node, Reshape):
            out = h.reshape(n, *node.shape)
            keep.append(None)
        else:
            out = h + vals[node.b]
            keep.append(None)
        vals.append(out)
    grads: list[torch.Tensor | None] = [None] * len(vals)
    grads[-1] = torch.full_like(vals[-1], -1.0)  # d sum(-f) / d f = -1 for every sample
    ws = iter(reversed(params))
    for i in range(len(program.nodes) - 1, -1, -1):
        node, gy = program.nodes[i], grads[i + 1]
        if isinstance(node, Affine):
            w = next(ws)
            if gy is None:
                continue
            a = vals[node.src]
            if node.conv:
                # conv_transpose2d is the adjoint of conv2d; output_padding recovers sizes lost to the stride.
                full = [(gy.shape[d + 2] - 1) * node.stride[d] - 2 * node.padding[d] + node.kernel[d] for d in (0, 1)]
                out_pad = (a.shape[-2] - full[0], a.shape[-1] - full[1])
                g = F.conv_transpose2d(gy, w, None, node.stride, node.padding, output_padding=out_pad)
            else:
                g = (gy.reshape(n, -1) @ w).reshape(a.shape)
            _accumulate(grads, node.src, g)
        elif gy is None:
            continue
        elif isinstance(node, Act):
            _accumulate(grads, node.src, gy * keep[i])
        elif isinstance(node, Reshape):
            _accumulate(grads, node.src, gy.reshape(vals[node.src].shape))
        else:
            _accumulate(grads, node.a, gy)
            _accumulate(grads, node.b, gy)
    g0 = grads[0]
    return torch.zeros_like(x) if g0 is None else g0


def _accumulate(grads: list, v: int, g: torch.Tensor) -> None:
    grads[v] = g if grads[v] is None else grads[v] + g


def _func_energy_grad(model_ref: weakref.ref[nn.Module]) -> Callable:
    """``torch.func.grad`` of sum(-f) w.r.t. the input. Holds the model weakly: the cache entry (a value of the
    weak-keyed ``_COMPILED``) must not keep its own key alive."""
    from torch.func import functional_call, grad

    def neg_energy_sum(
        params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], x: torch.Tensor
    ) -> torch.Tensor:
        out = functional_call(model_ref(), (params, buffers), (x,))
        return -out.sum()

    return grad(neg_energy_sum, argnums=2)


def conv_input_grad(
    grad_output: torch.Tensor,
    input: torch.Tensor,
    weight: torch.Tensor,
    bias_sizes: object,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    transposed: bool,
    output_padding: list[int],
    groups: int,
    output_mask: list[bool],
) -> tuple[torch.Tensor | None, None, None] | object:
    """``aten.convolution_backward`` asked for the input gradient only (what an input gradient needs) as the
    transposed convolution it is, so the compiled graph runs oneDNN's conv_transpose like the chain program instead of
    the full backward kernel; any other request (weight or bias gradients, transposed or non-2-D convolutions) is left
    as it was (``NotImplemented``)."""
    if transposed or output_mask[1] or output_mask[2] or not output_mask[0] or weight.dim() != 4:
        return NotImplemented
    k = weight.shape[2:]
    out_pad = [
        input.shape[d + 2]
        - ((grad_output.shape[d + 2] - 1) * stride[d] - 2 * padding[d] + dilation[d] * (k[d] - 1) + 1)
        for d in (0, 1)
    ]
    g = torch.ops.aten.convolution.default(grad_output, weight, None, stride, padding, dilation, True, out_pad, groups)
    return g, None, None


def _inductor_input_grad(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
    """The inductor backend with ``conv_input_grad`` in its decomposition table (the generic gradient's backend)."""
    from torch._functorch import config as functorch_config
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.decomposition import select_decomp_table

    table = dict(select_decomp_table())
    table[torch.ops.aten.convolution_backward.default] = conv_input_grad
    # the AOT-autograd cache keys on the captured graph, not on the decomposition table: a hit would bring back a
    # graph traced without conv_input_grad
    with functorch_config.patch(enable_autograd_cache=False):
        return compile_fx(gm, example_inputs, decompositions=table)


def _own_backend(compile_kwargs: dict) -> bool:
    """Whether ``compile_kwargs`` choose torch.compile's backend themselves (then the generic gradient keeps it)."""
    return any(k in compile_kwargs for k in ("backend", "mode", "options"))


def compile_generic(fn: Callable, compile_kwargs: dict, graphs: list[int] | None = None) -> Callable:
    """``torch.compile`` of the generic gradient: inductor with the convolution input gradient as a transposed
    convolution (``conv_input_grad``) unless ``compile_kwargs`` name their own backend, mode or options. ``graphs``:
    gets one entry (the node count) per graph compiled."""
    if _own_backend(compile_kwargs):
        return torch.compile(fn, **compile_kwargs)

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        if graphs is not None:
            graphs.append(len(gm.graph.nodes))
        return _inductor_input_grad(gm, example_inputs)

    return torch.compile(fn, backend=backend, **compile_kwargs)


def runs_uncompiled(grad_fn: EnergyGrad) -> bool:
    """True when ``grad_fn`` (from ``compiled_energy_grad``) has run the generic path and no graph was compiled for it:
    dynamo could not trace the gradient (a graph break inside ``torch.func.grad``, e.g. data-dependent control flow)
    and runs ``torch.func`` eagerly, which is no faster than autograd. False where it cannot tell (a backend of the
    caller's own)."""
    state = getattr(grad_fn, "generic_state", None)
    return state is not None and state["counted"] and state["calls"] > 0 and not state["graphs"]


_COMPILED: weakref.WeakKeyDictionary[nn.Module, dict] = weakref.WeakKeyDictionary()


def compiled_energy_grad(
    model: nn.Module, *, channels_last: bool | None = None, **compile_kwargs: object
) -> EnergyGrad:
    """A compiled g(x) for ``model``. ``channels_last=None`` picks it on CPU for 4-D inputs.

    Cached per model object (weakly) and settings, so every sampler on one model shares one compiled program
    (torch.compile costs ~10-25 s per graph on a small CPU)."""
    per_model = _COMPILED.setdefault(model, {})
    key = (channels_last, tuple(sorted(compile_kwargs.items())))
    if key not in per_model:
        per_model[key] = _build_compiled(model, channels_last, compile_kwargs)
    return per_model[key]


def _build_compiled(model: nn.Module, channels_last: bool | None, compile_kwargs: dict) -> EnergyGrad:
    model_ref = weakref.ref(model)
    programs: dict[Program, Callable] = {}  # one compiled chain program per recognised structure
    generic: list[Callable] = []
    state: dict = {"calls": 0, "graphs": [], "counted": not _own_backend(compile_kwargs)}  # what runs_uncompiled reads

    def run(x: torch.Tensor) -> torch.Tensor:
        owner = model_ref()
        found = recognise(owner, x)
        if isinstance(found, Program):
            fn = programs.get(found)
            if fn is None:
                fn = programs[found] = torch.compile(functools.partial(program_energy_grad, found), **compile_kwargs)
            return fn(found.read(owner), x)
        if not generic:
            generic.append(compile_generic(_func_energy_grad(model_ref), compile_kwargs, state["graphs"]))
        state["calls"] += 1
        params = {k: v.detach() for k, v in owner.named_parameters()}
        buffers = dict(owner.named_buffers())
        return generic[0](params, buffers, x)

    def energy_grad(x: torch.Tensor) -> torch.Tensor:
        cl = channels_last if channels_last is not None else (x.device.type == "cpu")
        if cl and x.dim() == 4:
            g = run(x.contiguous(memory_format=torch.channels_last))
            return g.contiguous()
        return run(x)

    energy_grad.generic_state = state
    return energy_grad
