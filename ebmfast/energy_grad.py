"""The energy gradient g = grad_x sum(-f(x)): one model forward plus the input-gradient backward.

Two builders:
- ``eager``: autograd (what the reference does).
- ``compiled``: ``torch.compile`` of a gradient program. For models that are a plain chain of layers we know
  (``CNNModel``, or an ``nn.Sequential`` of Conv2d / Linear / Flatten / Swish / SiLU / Tanh / Identity), the program
  is the chain rule written out (forward keeping what the backward needs, then conv_transpose / matmul /
  elementwise derivative back to the input); only the input gradient is formed, never weight gradients.
  Any other ``nn.Module`` goes through ``torch.func.grad`` over ``functional_call``. Either way parameters are read
  at call time, so in-place optimizer updates are seen; replacing a parameter tensor changes the cache key.
  On CPU, 4-D inputs are run channels-last (oneDNN's strided conv_transpose is several times faster that way).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .models import CNNModel, Swish

__all__ = ["eager_energy_grad", "compiled_energy_grad", "chain_layers", "chain_energy_grad"]

EnergyGrad = Callable[[torch.Tensor], torch.Tensor]

_ELEMENTWISE = (Swish, nn.SiLU, nn.Tanh, nn.Identity)


def eager_energy_grad(model: nn.Module) -> EnergyGrad:
    from .reference import energy_grad_reference

    return lambda x: energy_grad_reference(model, x)


def chain_layers(model: nn.Module) -> list[nn.Module] | None:
    """The layer list when ``model`` is a chain the hand-written gradient program supports, else None."""
    if type(model) is CNNModel:
        seq = model.cnn_layers
    elif type(model) is nn.Sequential:
        seq = model
    else:
        return None
    layers = list(seq)
    for layer in layers:
        if isinstance(layer, nn.Conv2d):
            if (
                layer.groups != 1
                or layer.dilation != (1, 1)
                or layer.padding_mode != "zeros"
                or isinstance(layer.padding, str)
            ):
                return None
        elif isinstance(layer, nn.Flatten):
            if layer.start_dim != 1 or layer.end_dim != -1:
                return None
        elif not isinstance(layer, (nn.Linear,) + _ELEMENTWISE):
            return None
    if not layers or not isinstance(layers[-1], nn.Linear) or layers[-1].out_features != 1:
        return None  # the chain must end in one score per sample
    return layers


def chain_energy_grad(layers: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """grad_x sum(-f(x)) for a chain of supported layers, by the chain rule written out (no autograd)."""
    saved = []
    h = x
    for layer in layers:
        saved.append(h)
        if isinstance(layer, nn.Conv2d):
            h = F.conv2d(h, layer.weight, layer.bias, layer.stride, layer.padding)
        elif isinstance(layer, nn.Linear):
            h = F.linear(h, layer.weight, layer.bias)
        elif isinstance(layer, nn.Flatten):
            h = h.flatten(1)
        elif isinstance(layer, (Swish, nn.SiLU)):
            s = torch.sigmoid(h)
            saved[-1] = (h, s)
            h = h * s
        elif isinstance(layer, nn.Tanh):
            h = torch.tanh(h)
            saved[-1] = h
        # Identity: nothing
    # f has shape (N, 1); d sum(-f) / d f = -1 for every sample.
    gy = torch.full_like(h, -1.0)
    for layer, a in zip(reversed(layers), reversed(saved)):
        if isinstance(layer, nn.Conv2d):
            # conv_transpose2d is the adjoint of conv2d; output_padding recovers sizes lost to the stride.
            full = [
                (gy.shape[d + 2] - 1) * layer.stride[d] - 2 * layer.padding[d] + layer.kernel_size[d] for d in (0, 1)
            ]
            out_pad = (a.shape[-2] - full[0], a.shape[-1] - full[1])
            gy = F.conv_transpose2d(gy, layer.weight, None, layer.stride, layer.padding, output_padding=out_pad)
        elif isinstance(layer, nn.Linear):
            gy = gy @ layer.weight
        elif isinstance(layer, nn.Flatten):
            gy = gy.reshape(a.shape)
        elif isinstance(layer, (Swish, nn.SiLU)):
            pre, s = a
            gy = gy * (s * (1.0 + pre * (1.0 - s)))  # d/dh [h sigmoid(h)]
        elif isinstance(layer, nn.Tanh):
            gy = gy * (1.0 - a * a)
    return gy


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
    layers = chain_layers(model)
    if layers is not None:
        program = torch.compile(lambda x: chain_energy_grad(layers, x), **compile_kwargs)

        def run(x: torch.Tensor) -> torch.Tensor:
            return program(x)
    else:
        model_ref = weakref.ref(model)
        gfn = torch.compile(_func_energy_grad(model_ref), **compile_kwargs)

        def run(x: torch.Tensor) -> torch.Tensor:
            owner = model_ref()
            params = {k: v.detach() for k, v in owner.named_parameters()}
            buffers = dict(owner.named_buffers())
            return gfn(params, buffers, x)

    def energy_grad(x: torch.Tensor) -> torch.Tensor:
        cl = channels_last if channels_last is not None else (x.device.type == "cpu")
        if cl and x.dim() == 4:
            g = run(x.contiguous(memory_format=torch.channels_last))
            return g.contiguous()
        return run(x)

    energy_grad.uses_chain_program = layers is not None  # type: ignore[attr-defined]
    return energy_grad
