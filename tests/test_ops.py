"""The torch custom ops: schema/fake-impl checks (torch.library.opcheck), torch.compile visibility, and the
package's behaviour without Triton (imports, CPU works, CUDA asks for Triton)."""

import subprocess
import sys
import textwrap

import pytest
import torch

from ebmfast import ops


def step_args(n=37, with_z=False, with_g=True):
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(n, generator=gen) * 2 - 1
    g = torch.randn(n, generator=gen) * 0.05 if with_g else None
    z = torch.randn(n, generator=gen) if with_z else None
    rng = torch.tensor([3, 5], dtype=torch.int64)
    return (x, g, z, rng, 10.0, 0.03, 0.005, -1.0, 1.0, 1, True)


@pytest.mark.parametrize("with_z, with_g", [(False, True), (True, True), (False, False)])
def test_opcheck_step(with_z, with_g):
    torch.library.opcheck(
        torch.ops.ebmfast.langevin_step_.default,
        step_args(with_z=with_z, with_g=with_g),
        test_utils=("test_schema", "test_faketensor"),
    )


def test_opcheck_normal():
    rng = torch.tensor([3, 5], dtype=torch.int64)
    torch.library.opcheck(
        torch.ops.ebmfast.langevin_normal.default, (rng, 11, 2), test_utils=("test_schema", "test_faketensor")
    )


def test_check_step_args_errors():
    x, g, rng = torch.zeros(4), torch.zeros(5), torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ValueError, match="g must be a contiguous tensor shaped like x"):
        ops.fused_step_(
            x, g, rng, step_size=1.0, grad_clip=1.0, noise_std=0.0, lo=-1, hi=1, noise_index=0, add_noise=False
        )
    with pytest.raises(ValueError, match="rng must be an int64 tensor of 2 elements"):
        ops.fused_step_(
            x,
            None,
            torch.zeros(3),
            step_size=1.0,
            grad_clip=1.0,
            noise_std=0.0,
            lo=-1,
            hi=1,
            noise_index=0,
            add_noise=True,
        )
    with pytest.raises(ValueError, match="x must be contiguous"):
        ops.fused_step_(
            torch.zeros(4, 4).t(),
            None,
            rng,
            step_size=1.0,
            grad_clip=1.0,
            noise_std=0.0,
            lo=-1,
            hi=1,
            noise_index=0,
            add_noise=True,
        )


def test_cpu_stream_is_a_function_of_seed_and_counter():
    a = ops.cpu_normal(torch.tensor([1, 10]), (100,), 2)
    b = ops.cpu_normal(torch.tensor([1, 11]), (100,), 1)
    c = ops.cpu_normal(torch.tensor([2, 10]), (100,), 2)
    assert torch.equal(a, b) and not torch.equal(a, c)


NO_TRITON = textwrap.dedent(
    """
    import builtins, torch
    real = builtins.__import__
    def blocked(name, globals=None, locals=None, fromlist=(), level=0):
        from_kernels = level == 0 and name == "ebmfast" and fromlist and "kernels" in fromlist
        if name.startswith("ebmfast.kernels") or from_kernels:
            raise ImportError("triton missing (simulated)")
        return real(name, globals, locals, fromlist, level)
    builtins.__import__ = blocked
    from ebmfast import CNNModel, LangevinSampler, ops
    from ebmfast.sampler import resolve_backend
    assert not ops.HAS_TRITON
    x = torch.rand(2, 1, 28, 28) * 2 - 1
    m = CNNModel(hidden_features=8)
    ref = LangevinSampler(m, steps=3, backend="eager", seed=0).sample(x)
    out = LangevinSampler(m, steps=3, backend="fused", seed=0).sample(x)
    assert (out - ref).abs().max() < 1e-5
    for backend in ("fused", "graph"):
        try:
            resolve_backend(backend, torch.device("cuda"))
        except RuntimeError as exc:
            assert "needs Triton" in str(exc), exc
        else:
            raise AssertionError("expected a clear error")
    assert resolve_backend("auto", torch.device("cuda")) == "compiled"
    print("OK")
    """
)


@pytest.mark.slow
def test_package_works_without_triton():
    proc = subprocess.run([sys.executable, "-c", NO_TRITON], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.slow
def test_ops_trace_under_torch_compile_fullgraph():
    """The ops are visible to torch.compile as single nodes (no graph break), with the same results as eager."""

    def chain(x, g, rng):
        y = x.clone()
        torch.ops.ebmfast.langevin_step_(y, g, None, rng, 10.0, 0.03, 0.005, -1.0, 1.0, 1, True)
        z = torch.ops.ebmfast.langevin_normal(rng, y.numel(), 2)
        return y, z

    x, g, _, rng, *_ = step_args(n=300)
    compiled = torch.compile(chain, fullgraph=True, backend="aot_eager")
    y_c, z_c = compiled(x, g, rng)
    y_e, z_e = chain(x, g, rng)
    assert torch.equal(y_c, y_e) and torch.equal(z_c, z_e)
