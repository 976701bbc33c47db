"""Analytic FLOP count of one Langevin sample-step: the model forward plus the input-gradient backward.

The count comes from ``torch.utils.flop_counter.FlopCounterMode`` (matmuls and convolutions, 2 FLOP per
multiply-add; elementwise work is not counted, as in the usual MFU convention) run on the energy gradient
``g = grad_x sum(-f(x))`` with the parameters frozen, exactly the work a sampler does per step. Weight gradients
are not formed while sampling, so they are not counted.

For the seed's CNN (hidden_features=32) on 1x28x28 images this is 3,424,512 FLOP per sample-step
(2 x (1,679,360 conv + 32,896 linear)).

Counting runs on a copy of the model on the ``meta`` device when it can (no memory, no compute, any batch size);
models that cannot run on ``meta`` are counted on a CPU copy with a batch of 2 and scaled linearly. Results are
cached per (model class, model configuration, parameter shapes, input shape, dtype).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..reference import as_scores

__all__ = ["count_step_flops", "flops_per_sample_step", "clear_cache"]

_CACHE: dict = {}


def _model_key(model: nn.Module) -> tuple:
    # repr() of an nn.Module lists every submodule with its configuration (channels, kernel sizes, strides...);
    # parameter shapes and dtypes complete it for modules whose repr hides them.
    params = tuple((name, tuple(p.shape), str(p.dtype)) for name, p in model.named_parameters())
    return (type(model).__module__, type(model).__qualname__, repr(model), params)


def _count(model: nn.Module, x: torch.Tensor) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    xg = x.detach().requires_grad_(True)
    # .backward() on a leaf input rather than torch.autograd.grad: FlopCounterMode's module tracker installs
    # backward hooks that autograd.grad rejects in recent torch versions ("A leaf node was passed to
    # _will_engine_execute_node ..."); with frozen parameters the two compute the same input gradient.
    with FlopCounterMode(display=False) as counter:
        out = as_scores(model(xg), x.shape[0])  # (N,) or (N, 1); anything else is refused
        (-out.sum()).backward()
    return int(counter.get_total_flops())


def count_step_flops(model: nn.Module, input_shape, dtype: torch.dtype = torch.float32) -> int:
    """FLOP of one Langevin step (forward + input gradient) for a whole batch of shape ``input_shape`` (N, ...).

    Cached; the model itself is never modified (a copy is counted)."""
    input_shape = tuple(int(s) for s in input_shape)
    if len(input_shape) < 2 or any(s <= 0 for s in input_shape):
        raise ValueError(f"input_shape must be (N, ...) with positive sizes, got {input_shape!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    key = (_model_key(model), input_shape, str(dtype))
    if key in _CACHE:
        return _CACHE[key]
    flops = None
    try:
        meta_model = copy.deepcopy(model).to("meta")
        flops = _count(meta_model, torch.empty(input_shape, dtype=dtype, device="meta"))
    except Exception:  # a model that cannot run on meta tensors (data-dependent control flow, .item(), ...)
        flops = None
    if flops is None:
        n = min(2, input_shape[0])
        cpu_model = copy.deepcopy(model).to("cpu")
        x = torch.rand((n, *input_shape[1:]), dtype=dtype).mul_(2).sub_(1)
        flops = _count(cpu_model, x) * input_shape[0] // n
    _CACHE[key] = flops
    return flops


def flops_per_sample_step(model: nn.Module, sample_shape, dtype: torch.dtype = torch.float32) -> float:
    """FLOP per sample per Langevin step for samples of shape ``sample_shape`` (without the batch dimension)."""
    sample_shape = tuple(int(s) for s in sample_shape)
    batch = 4  # any batch gives the same per-sample figure for per-sample models; 4 avoids batch-1 special cases
    return count_step_flops(model, (batch, *sample_shape), dtype) / batch


def clear_cache() -> None:
    _CACHE.clear()
