"""``LangevinSampler``: the seed's Langevin dynamics behind one API, with interchangeable backends.

Backends (``backend=``):
- ``eager``: the reference loop (``ebmfast.reference``), autograd gradient.
- ``compiled``: the same loop with the energy gradient from ``torch.compile`` (``ebmfast.energy_grad``).
- ``fused``: compiled gradient + one fused update op per step (``ebmfast.langevin`` -> Triton on CUDA): the op applies
  step k's clipped gradient step and clamp together with step k+1's noise and clamp, so a K-step chain is one
  noise launch + K gradients + K fused updates.
- ``graph`` (CUDA only): the whole ``fused`` chain captured once in a CUDA graph and replayed (``ebmfast.graph``).
- ``triton``: the energy gradient on our own Triton layer kernels (``ebmfast.layers``), the update being the epilogue
  of the last launch; on CUDA the K-step chain is captured in a CUDA graph like ``graph``. For models that
  ``ebmfast.recognise`` reads as a plain layer chain of what the kernels run, whatever their classes are called
  (``ebmfast.layers.unsupported_reason`` says why another is not); runs on CPU only under the Triton interpreter
  (how the tests run it).
- ``persistent``: the whole K-step chain in one persistent Triton kernel (``ebmfast.persistent``): each program
  owns a block of samples for all K steps, built from the same layer device functions; same models as ``triton``
  (plus a per-sample scratch budget). Captured in a CUDA graph on CUDA as well.
- ``auto``: on CUDA the fastest measured of ``graph`` and the kernel backends the model supports
  (``ebmfast.autotune``; ``graph`` where nothing was measured, ``compiled`` when Triton is missing); ``compiled`` on
  CPU for a recognised model (the chain program; not timed, so runs reproduce), and for any other model unless eager
  autograd times faster for it and this shape (``ebmfast.autotune.time_cpu``: once, at the first call, compile time
  apart). ``sampler.explain(x)`` says what runs and why, and for the compiled gradient
  whether the chain program runs the model (or why not).

Noise. Every backend draws the same stream: z_k = normal(seed, counter + k), a pure function of the sampler's seed,
a device-side counter and the element index (Philox in the kernel on CUDA; a seeded CPU generator on CPU); each call
advances the counter by its step count. So a seeded sampler reproduces its chains exactly, successive calls (and CUDA
graph replays) draw new noise, and ``noise_stream`` shows the draws the next call will use, which the reference can
consume to check any backend trajectory by trajectory. On CUDA "exactly" means bitwise only with
``torch.backends.cudnn.deterministic = True``: otherwise cuDNN may sum in another order from one capture to the next
(seen on an H200: two seeded runs agreed to 4 digits, within the 1e-4 parity tolerance, not bitwise).
``sample(noise=...)`` takes explicit draws instead.

Stopping. With ``stop_check`` set (a callable returning True when a stop was asked for; the trainer sets it), a chain
longer than ``chunk_steps`` (default ``CHUNK_STEPS``) runs as consecutive chains of at most that many steps, the same
steps and noise as one chain, and asks ``stop_check`` before each: a stop raises ``ebmfast.errors.StopRequested``
with the noise counter back where the call started. Shorter chains, persistent-kernel chains, chains with a
trajectory or explicit noise and chains inside a caller's CUDA-graph capture run whole as before.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from . import langevin, ops
from .chain import Chain, FusedStepper, LayerStepper, PersistentChain, StepChain
from .energy_grad import compiled_energy_grad, eager_energy_grad, runs_uncompiled
from .errors import StopRequested
from .opdef import HAS_TRITON, triton_unavailable_reason
from .recognise import structure_key
from .reference import SEED_STEP, StepSettings, energy_scores, langevin_reference, sampling_mode
from .validation import (
    capturing,
    check_choice,
    check_clamp,
    check_finite_result,
    check_nonneg_float,
    check_positive_float,
    check_positive_int,
    check_samples,
)

__all__ = [
    "LangevinSampler",
    "BACKENDS",
    "CHUNK_STEPS",
    "KERNEL_BACKENDS",
    "PRECISION_MODES",
    "precision_context",
    "resolve_backend",
]

BACKENDS = ("auto", "eager", "compiled", "fused", "graph", "triton", "persistent")
KERNEL_BACKENDS = ("triton", "persistent")  # backends on our own layer kernels: for recognised layer chains only
# the sampler's precision modes (what ``precision=`` accepts); the layer kernels encode them as numbers in
# kernels/geometry.py's PRECISIONS
PRECISION_MODES = ("fp32", "tf32", "bf16")
CHUNK_STEPS = 1000  # a chain longer than this looks at stop_check between chunks of this many steps


@contextmanager
def precision_context(precision: str, device_type: str) -> Iterator[None]:
    """The matmul/convolution precision of ``precision`` on ``device_type``, restored afterwards.

    On CUDA, fp32 turns TF32 off for cuDNN and cuBLAS (true fp32 products) and tf32/bf16 turn it on (bf16 itself is
    an autocast around the gradient, see ``LangevinSampler._energy_grad``). Other devices have no TF32 switch, so
    nothing is changed there."""
    check_choice(precision, PRECISION_MODES, "precision")
    if device_type != "cuda":
        yield
        return
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    tf32 = precision != "fp32"
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend ``backend`` means on ``device`` (``auto`` resolved for the device, availability checked).

    Model-dependent choices (``auto`` among measured CUDA backends, whether a model runs on the layer kernels) are
    made per call by ``LangevinSampler``; see ``LangevinSampler.explain``."""
    check_choice(backend, BACKENDS, "backend")
    if device.type == "cuda":
        if backend == "auto":
            return "graph" if HAS_TRITON else "compiled"
        if backend in ("fused", "graph", *KERNEL_BACKENDS) and not HAS_TRITON:
            raise RuntimeError(f"backend={backend!r} on CUDA needs Triton: {triton_unavailable_reason()}")
        return backend
    if backend == "auto":
        return "compiled"
    if backend == "graph":
        raise ValueError(f"backend='graph' needs a CUDA device (CUDA graphs), got tensors on {device}")
    if backend in KERNEL_BACKENDS:
        reason = ops.layer_kernels_unavailable_reason(device)
        if reason is not None:
            raise ValueError(f"backend={backend!r}: {reason}")
    return backend


class _EnergyWatch:
    """A forward hook on the model while an eager chain runs: per sample, the first step (1-based, 0 = none) whose
    energy was NaN or inf, kept on the device (no synchronisation; read once after the chain)."""

    def __init__(self, model: nn.Module, n: int, device: torch.device) -> None:
        self.first_bad = torch.zeros(n, dtype=torch.long, device=device)
        self.step = 0
        self.handle = model.register_forward_hook(self._seen)

    def _seen(self, module: nn.Module, args: tuple, out: object) -> None:
        self.step += 1
        n = self.first_bad.shape[0]
        if isinstance(out, torch.Tensor) and out.dim() >= 1 and out.shape[0] == n:
            bad = ~torch.isfinite(out.detach().reshape(n, -1)).all(1)
            self.first_bad = torch.where(bad & (self.first_bad == 0), self.step, self.first_bad)

    def remove(self) -> None:
        self.handle.remove()


class LangevinSampler:
    """Langevin dynamics on an energy model ``f(x) = -E(x)`` (any ``nn.Module`` giving one score per sample).

    Per step: x <- clamp(x + noise_std*z); g <- clamp(grad_x sum(-f(x)), +-grad_clip); x <- clamp(x - step_size*g).

    ``check_finite`` (default True) rejects inputs holding NaN/inf with a clear error and checks the returned state
    and, on the eager backend, the energy of every step (``ebmfast.errors.NonFiniteError`` naming the samples, and the
    step where the energy or a returned trajectory shows it); on CUDA each check waits for the device once per call
    (not per step). Turn it off where inputs are known finite (e.g.
    replay-buffer draws) and every host synchronisation counts. ``compile_kwargs`` go to ``torch.compile`` (CUDA
    default: ``dynamic=False``). ``channels_last`` (compiled / fused / graph backends, 4-D inputs): run the compiled
    gradient in channels-last layout; ``None`` = on CPU only (measured faster there). On an H200, cuDNN spent 40 of 220
    us per step of the NCHW graph chain at batch 128 converting layouts (20 transposes), so ``True`` is the candidate to
    measure there (``bench/profile_step.py``).
    """

    def __init__(
        self,
        model: nn.Module,
        steps: int = 60,
        step_size: float = SEED_STEP.step_size,
        noise_std: float = SEED_STEP.noise_std,
        grad_clip: float = SEED_STEP.grad_clip,
        clamp: tuple[float, float] = SEED_STEP.clamp,
        backend: str = "auto",
        precision: str = "fp32",
        seed: int | None = None,
        compile_kwargs: dict | None = None,
        check_finite: bool = True,
        channels_last: bool | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module returning one score per sample, got {type(model).__name__}")
        self.model = model
        self.steps = check_positive_int(steps, "steps")
        self.step_size = check_positive_float(step_size, "step_size")
        self.noise_std = check_nonneg_float(noise_std, "noise_std")
        self.grad_clip = check_positive_float(grad_clip, "grad_clip")
        self.clamp = check_clamp(clamp)
        self.backend = check_choice(backend, BACKENDS, "backend")
        self.precision = check_choice(precision, PRECISION_MODES, "precision")
        self.compile_kwargs = dict(compile_kwargs or {})
        self.check_finite = bool(check_finite)
        if channels_last is not None and not isinstance(channels_last, bool):
            raise TypeError(f"channels_last must be None (automatic), True or False, got {channels_last!r}")
        self.channels_last = channels_last
        self._grad_fns: dict = {}
        self._graphs = None  # ebmfast.graph.GraphCache, created on first CUDA use
        self._checked: set = set()
        self._choices: dict = {}  # (shape, dtype, device, precision) -> (backend, why): auto's choice and reasons
        self._rng: dict[torch.device, torch.Tensor] = {}
        self.manual_seed(seed)
        self.last_backend: str | None = None
        self.stop_check: Callable[[], bool] | None = None  # asked between the chunks of a long chain (module doc)
        self.chunk_steps = CHUNK_STEPS

    # ----------------------------------------------------------------------------------------------- RNG state
    def manual_seed(self, seed: int | None = None) -> None:
        """Restart the noise stream. ``seed=None`` takes one from torch's default generator (so
        ``torch.manual_seed`` makes an unseeded sampler reproducible too)."""
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise ValueError(f"seed must be a non-negative integer below 2**63 (it is stored as int64), got {seed!r}")
        self.seed = seed
        for rng in self._rng.values():
            rng.copy_(torch.tensor([seed, 0], dtype=torch.int64))

    def rng_state(self, device: torch.device | str) -> torch.Tensor:
        """The int64[2] (seed, counter) tensor on ``device`` that the kernels read and the chain advances."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device not in self._rng:
            counter = 0
            if self._rng:  # keep one logical stream across devices
                counter = int(next(iter(self._rng.values()))[1])
            self._rng[device] = torch.tensor([self.seed, counter], dtype=torch.int64, device=device)
        return self._rng[device]

    def state_dict(self) -> dict:
        counters = {str(d): int(t[1]) for d, t in self._rng.items()}
        return {"seed": self.seed, "counters": counters}

    def load_state_dict(self, state: dict) -> None:
        if "seed" not in state:
            raise KeyError(f"sampler state needs 'seed' (and 'counters'), got keys {sorted(state)}")
        self.manual_seed(int(state["seed"]))
        for dev, counter in state.get("counters", {}).items():
            try:
                rng = self.rng_state(dev)
            except (RuntimeError, AssertionError):  # e.g. a CUDA counter restored on a CPU-only machine
                rng = self.rng_state("cpu")
            rng[1] = int(counter)

    def noise_stream(self, x: torch.Tensor, steps: int | None = None) -> torch.Tensor:
        """The standard-normal draws ``(steps, *x.shape)`` that the next ``sample(x, steps)`` will use.

        Does not advance the stream. Feed it to ``langevin_reference(..., noise=...)`` for trajectory parity."""
        steps = self.steps if steps is None else check_positive_int(steps, "steps")
        rng = self.rng_state(x.device)
        return torch.stack([self._draw(rng, x, k) for k in range(steps)])

    def _draw(self, rng: torch.Tensor, x: torch.Tensor, k: int) -> torch.Tensor:
        if x.device.type == "cuda" and not HAS_TRITON:
            # No Triton: torch's own CUDA Philox, seeded from (seed, counter + k) on the host.
            gen = torch.Generator(device=x.device).manual_seed(langevin.mix(*(int(v) for v in rng.tolist())) + k)
            return torch.randn(x.shape, device=x.device, generator=gen)
        z = torch.ops.ebmfast.langevin_normal(rng, x.numel(), k)
        return z.view(x.shape)

    # ----------------------------------------------------------------------------------------------- sampling
    def resolve(self, device: torch.device | str) -> str:
        """The backend for ``device`` before looking at the model or the batch (see ``explain`` for the final one)."""
        return resolve_backend(self.backend, torch.device(device))

    def _kernel_reason(self, backend: str, x: torch.Tensor) -> str | None:
        """Why ``backend`` (a kernel backend) cannot run this model on inputs like ``x``, or None."""
        if backend == "persistent":
            from .persistent import unsupported_reason
        else:
            from .layers import unsupported_reason
        return unsupported_reason(self.model, x, self.precision)

    def _choose(self, x: torch.Tensor, measure: bool = True) -> tuple[str, str]:
        """(backend, why) for a call on ``x``; cached per shape, dtype, device, precision and model structure (a model
        changed after a first call is chosen for again). ``measure=False`` (``explain``): a choice that needs timing
        (``auto`` on CPU) is not made yet but said so."""
        key = (tuple(x.shape), x.dtype, x.device, self.precision, structure_key(self.model))
        if key in self._choices:
            return self._choices[key]
        base = self.resolve(x.device)
        if self.backend == "auto" and x.device.type == "cpu":
            from .recognise import recognise

            if not isinstance(recognise(self.model, x), str):  # no timing: the same numbers on every run
                choice = (base, "auto on cpu: the compiled chain program of the recognised model (not timed)")
            elif not measure:
                return base, "auto on cpu: compiled unless eager times faster at the first sample (not timed yet)"
            else:
                choice = self._time_cpu_choice(x)
            self._choices[key] = choice
            return choice
        if base in KERNEL_BACKENDS:
            reason = self._kernel_reason(base, x)
            if reason is not None:
                raise ValueError(
                    f"backend={base!r} cannot run this model on inputs of shape {tuple(x.shape)}: {reason}. "
                    "Use backend='auto' (it falls back) or 'graph' / 'compiled'"
                )
            choice = (base, "asked for")
        elif self.backend == "auto" and base == "graph":
            from . import autotune

            allowed, skipped = ["graph"], []
            for candidate in KERNEL_BACKENDS:
                reason = self._kernel_reason(candidate, x)
                if reason is None:
                    allowed.append(candidate)
                else:
                    skipped.append(f"{candidate}: {reason}")
            chosen, source = autotune.choose(
                self.model, x, self.precision, allowed, tuner=lambda: autotune.tune(self, x, backends=allowed)
            )
            why = f"auto on CUDA: {source}; candidates {allowed}"
            if skipped:
                why += "; not candidates: " + "; ".join(skipped)
            choice = (chosen, why)
        elif self.backend == "auto":
            choice = (base, f"auto on {x.device.type}" + ("" if HAS_TRITON else " (no Triton)"))
        else:
            choice = (base, "asked for")
        self._choices[key] = choice
        return choice

    def _time_cpu_choice(self, x: torch.Tensor) -> tuple[str, str]:
        """auto on CPU: the compiled gradient or eager autograd, whichever ``autotune.time_cpu`` measures faster."""
        from . import autotune

        grads = {name: self._energy_grad(x.device, name) for name in ("compiled", "eager")}
        with sampling_mode(self.model):
            times = autotune.time_cpu(grads, x.detach())
        return autotune.choose_cpu(times, uncompiled=runs_uncompiled(self._grad_fns[x.device.type]))

    def explain(self, x: torch.Tensor) -> str:
        """Which backend ``sample(x)`` runs and why (auto's choice, fall-backs and their reasons). Cheap: where auto
        has still to time its choice (on CPU), it says so; after the first ``sample(x)`` it gives the times."""
        backend, why = self._choose(x, measure=False)
        text = f"backend={self.backend!r} -> {backend!r} for x of shape {tuple(x.shape)} on {x.device}: {why}"
        if backend in ("compiled", "fused", "graph"):
            from .recognise import recognise

            found = recognise(self.model, x)
            if isinstance(found, str):
                text += f"; gradient: torch.func (the chain program does not run this model: {found})"
            else:
                text += f"; gradient: the chain program of {found.describe()}"
        return text

    def _energy_grad(self, device: torch.device, backend: str = "compiled") -> Callable[[torch.Tensor], torch.Tensor]:
        """The gradient function for ``backend`` (eager autograd or compiled), in the sampler's precision."""
        if backend == "eager":
            fn = eager_energy_grad(self.model)
        else:
            if device.type not in self._grad_fns:
                kwargs = dict(self.compile_kwargs)
                if device.type == "cuda":
                    # Shape-specialised kernels: every CUDA graph is captured for one shape anyway, and torch's
                    # automatic dynamic shapes would otherwise switch to generic kernels after a second batch size.
                    kwargs.setdefault("dynamic", False)
                self._grad_fns[device.type] = compiled_energy_grad(
                    self.model, channels_last=self.channels_last, **kwargs
                )
            fn = self._grad_fns[device.type]
        if self.precision != "bf16":
            return fn

        def bf16_grad(x: torch.Tensor) -> torch.Tensor:
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
                g = fn(x)
            return g.to(x.dtype)

        return bf16_grad

    def _check_model_output(self, x: torch.Tensor) -> None:
        # Two samples where the batch has them: a model ending in ``.squeeze()`` returns (N,) for a batch but a
        # 0-d score for one sample.
        key = (id(self.model), min(x.shape[0], 2), tuple(x.shape[1:]), x.dtype, x.device)
        if key in self._checked:
            return
        with torch.no_grad(), sampling_mode(self.model):
            energy_scores(self.model, x[:2])
        self._checked.add(key)

    def sample(
        self,
        x: torch.Tensor,
        steps: int | None = None,
        return_trajectory: bool = False,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Run the chain from ``x`` (not modified); returns detached samples, or ``(samples, trajectory)`` with
        ``trajectory`` of shape ``(steps, *x.shape)`` holding the state after each step.

        ``noise``: optional explicit standard-normal draws ``(steps, *x.shape)`` instead of the sampler's stream
        (the stream is then not advanced)."""
        check_samples(x, finite=self.check_finite)
        steps = self.steps if steps is None else check_positive_int(steps, "steps")
        params = list(self.model.parameters())
        if params and params[0].device != x.device:
            raise ValueError(f"x is on {x.device} but the model's parameters are on {params[0].device}")
        if params and x.dtype != params[0].dtype and self.precision != "bf16":
            raise TypeError(f"x has dtype {x.dtype} but the model's parameters are {params[0].dtype}")
        if noise is not None:
            if tuple(noise.shape) != (steps, *x.shape):
                raise ValueError(
                    f"noise must have shape (steps, *x.shape) = {(steps, *x.shape)}, got {tuple(noise.shape)}"
                )
            noise = noise.to(device=x.device, dtype=x.dtype)
        self._check_model_output(x)
        backend, _ = self._choose(x)
        if (
            self.stop_check is not None
            and steps > self.chunk_steps
            and noise is None
            and not return_trajectory
            and backend != "persistent"
            and not capturing(x)
        ):
            return self._sample_in_chunks(x, steps)
        # A captured chain keeps only the final state and draws its own noise; inside a caller's CUDA-graph capture
        # (e.g. a whole training iteration) the chain is recorded inline into that graph instead.
        inline = return_trajectory or noise is not None or capturing(x) or x.device.type != "cuda"
        if backend == "graph" and inline:
            backend = "fused"
        self.last_backend = backend
        rng = self.rng_state(x.device)
        captured = backend == "graph" or (backend in KERNEL_BACKENDS and not inline)
        watch = None
        with sampling_mode(self.model), precision_context(self.precision, x.device.type):
            if captured:
                out, traj = self._graph_chain(x, steps, rng, backend), None
            elif backend == "fused" or backend in KERNEL_BACKENDS:
                state = x.detach().clone(memory_format=torch.contiguous_format)
                out, traj = self._chain(backend, state).run_(state, steps, rng, noise, return_trajectory)
            else:
                stream = noise if noise is not None else (lambda k: self._draw(rng, x, k))
                if self.check_finite and backend == "eager" and not capturing(x):
                    watch = _EnergyWatch(self.model, x.shape[0], x.device)  # the energy autograd computes anyway
                try:
                    res = langevin_reference(
                        self.model,
                        x,
                        steps,
                        self.step_size,
                        self.noise_std,
                        self.grad_clip,
                        self.clamp,
                        noise=stream,
                        return_trajectory=return_trajectory,
                        energy_grad=self._energy_grad(x.device, backend),
                    )
                finally:
                    if watch is not None:
                        watch.remove()
                out, traj = res if return_trajectory else (res, None)
            if noise is None and not captured:  # a captured chain advances its counter itself
                rng[1] += steps
        if self.check_finite:
            check_finite_result(out, steps, traj, None if watch is None else watch.first_bad)
        if return_trajectory:
            return out, traj
        return out

    def _sample_in_chunks(self, x: torch.Tensor, steps: int) -> torch.Tensor:
        """``steps`` steps as chains of at most ``chunk_steps``, asking ``stop_check`` before each (module doc)."""
        rng = self.rng_state(x.device)
        start = rng[1].clone()
        done = 0
        while done < steps:
            if self.stop_check():
                rng[1].copy_(start)
                raise StopRequested(f"stop requested after {done} of {steps} Langevin steps")
            n = min(self.chunk_steps, steps - done)
            x = self.sample(x, n)
            done += n
        return x

    @property
    def settings(self) -> StepSettings:
        """The step settings (step size, gradient clip, noise, clamp) as the chains take them."""
        lo, hi = self.clamp
        return StepSettings(self.step_size, self.grad_clip, self.noise_std, lo, hi)

    def _chain(self, backend: str, x: torch.Tensor) -> Chain:
        """The chain of ``backend`` for tensors like ``x``: "fused" / "graph": compiled gradient + fused update;
        "triton": the layer kernels, step by step; "persistent": the whole chain in one kernel."""
        settings = self.settings
        if backend == "persistent":
            from .persistent import persistent_program

            program = persistent_program(self.model, self.precision)
            return PersistentChain(program, settings, keep=program.scratch(x))
        if backend == "triton":
            from .layers import layer_program

            program = layer_program(self.model, self.precision)
            return StepChain(LayerStepper(program, settings, keep=program.scratch(x)))
        return StepChain(FusedStepper(self._energy_grad(x.device), settings))

    def _graph_chain(self, x: torch.Tensor, steps: int, rng: torch.Tensor, backend: str) -> torch.Tensor:
        from .graph import GraphCache

        if self._graphs is None:
            self._graphs = GraphCache()

        def make_chain(x_static: torch.Tensor) -> Chain:
            return self._chain(backend, x_static)

        return self._graphs.run(self.model, self.settings, self.precision, x, steps, rng, make_chain, backend)
