"""Layer geometry of a chain program, as plain Python (no Triton import): shared by the planner
(``ebmfast/layers.py``), the torch ops (which carry it as an ``int[]``) and the kernel launchers
(``kernels/layers.py``).

A chain is a list of affine layers A_0 .. A_{m-1} (Conv2d or Linear) with an optional activation between two of them;
A_{m-1} is the final ``Linear(k, 1)``. Every affine layer is described by one ``LayerSpec``. A ``Linear`` is a
"dense" layer: a convolution whose kernel covers its whole input map (C_IN x H x W, with H = W = 1 for a 2-D input),
so its input features are numbered in torch's NCHW flatten order d = c * H * W + h * W + w, whatever the storage.

Activations (``ACT_*`` codes, ``ACT_NAMES``): identity, Swish/SiLU, tanh, ReLU, LeakyReLU(slope), ELU(alpha),
Softplus(beta; torch's threshold 20 on beta * z), GELU (erf form), GELU (tanh approximation), sigmoid. A parameter
travels as the float32 bit pattern of its value in ``in_act_param`` / ``out_act_param`` (``float_bits`` /
``bits_float``; 0 for activations without one). Derivatives at kinks follow torch: ReLU'(0) = 0, LeakyReLU'(0) =
slope, ELU'(0) = alpha.

Residual adds (``res_src``): layer k with ``res_src = j`` computes z_k = A_k(h_k) + h_j, where h_j is the input of
affine layer j (h_j = act_{j-1}(z_{j-1})), and applies its activation after the add; the input gradient then also
flows into h_j (d h_j += dz_k). Implemented (``residual_reason`` says why a chain is refused): 1 <= j <= k <= m-2
(not from the chain state x, not on the final Linear), h_j with the per-sample shape of z_k in the same storage
(both conv maps C x H x W in NHWC, or both flat vectors: j's input a 2-D or 1x1 activation), at most one residual
from each h_j. A residual on the layer before the final Linear disables the fused head (its dz must be stored).
"""

from __future__ import annotations

import dataclasses
import struct
from functools import lru_cache

__all__ = [
    "ACT_NONE",
    "ACT_SWISH",
    "ACT_TANH",
    "ACT_RELU",
    "ACT_LEAKY_RELU",
    "ACT_ELU",
    "ACT_SOFTPLUS",
    "ACT_GELU",
    "ACT_GELU_TANH",
    "ACT_SIGMOID",
    "ACT_NAMES",
    "ACT_ZERO_AT_ZERO",
    "float_bits",
    "bits_float",
    "PRECISIONS",
    "GEOMETRY_VERSION",
    "LayerSpec",
    "encode_geometry",
    "decode_geometry",
    "HEAD_MAX_OUT",
    "fused_head",
    "residual_reason",
    "residual_sources",
    "launches_per_step",
]

ACT_NONE, ACT_SWISH, ACT_TANH = 0, 1, 2  # activation codes (Swish and SiLU are the same function)
ACT_RELU, ACT_LEAKY_RELU, ACT_ELU, ACT_SOFTPLUS = 3, 4, 5, 6  # LeakyReLU: slope; ELU: alpha; Softplus: beta
ACT_GELU, ACT_GELU_TANH, ACT_SIGMOID = 7, 8, 9  # GELU: erf form; GELU_TANH: the tanh approximation
ACT_NAMES = {
    ACT_NONE: "identity",
    ACT_SWISH: "swish",
    ACT_TANH: "tanh",
    ACT_RELU: "relu",
    ACT_LEAKY_RELU: "leaky_relu",
    ACT_ELU: "elu",
    ACT_SOFTPLUS: "softplus",
    ACT_GELU: "gelu",
    ACT_GELU_TANH: "gelu_tanh",
    ACT_SIGMOID: "sigmoid",
}
# act(0) = 0: a masked (zero-padded) input stays zero after the activation; the others are zeroed by the kernels
ACT_ZERO_AT_ZERO = frozenset(ACT_NAMES) - {ACT_SOFTPLUS, ACT_SIGMOID}
PRECISIONS = {"fp32": 0, "tf32": 1, "bf16": 2}  # the kernels' PREC constexpr
GEOMETRY_VERSION = 2
HEAD_MAX_OUT = 128  # a Linear before the final Linear(k, 1) with at most this many outputs runs as one fused launch


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def float_bits(v: float) -> int:
    """The float32 bit pattern of ``v`` (rounded to float32) as a signed 32-bit int (the geometry's int list)."""
    return struct.unpack("<i", struct.pack("<f", float(v)))[0]


def bits_float(i: int) -> float:
    """The float32 value whose bit pattern is ``i`` (inverse of ``float_bits``)."""
    return struct.unpack("<f", struct.pack("<i", int(i)))[0]


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """One affine layer: input map C_IN x H x W -> output map C_OUT x OH x OW (dense: OH = OW = 1).

    ``in_act``: activation applied to this layer's input (the one after the previous layer; ACT_NONE for the first).
    ``out_act``: activation after this layer. ``in_act_param`` / ``out_act_param``: their parameters as float32 bits
    (``float_bits``; 0 where the activation has none). ``res_src``: the affine layer j whose input h_j is added to
    this layer's pre-activation output (-1: none; see the module docstring). ``in_nchw``: the input is the chain
    state x in the user's layout (contiguous NCHW, or (N, D)); otherwise it is the previous layer's NHWC output."""

    dense: int
    c_in: int
    h: int
    w: int
    c_out: int
    oh: int
    ow: int
    kh: int
    kw: int
    sh: int
    sw: int
    ph: int
    pw: int
    in_act: int
    out_act: int
    has_bias: int
    in_nchw: int
    in_act_param: int = 0
    out_act_param: int = 0
    res_src: int = -1

    @property
    def in_act_value(self) -> float:
        """``in_act``'s parameter as a float (the kernels' constexpr)."""
        return bits_float(self.in_act_param)

    @property
    def out_act_value(self) -> float:
        """``out_act``'s parameter as a float."""
        return bits_float(self.out_act_param)

    @property
    def d_in(self) -> int:
        """Input elements per sample."""
        return self.c_in * self.h * self.w

    @property
    def d_out(self) -> int:
        """Output elements per sample."""
        return self.c_out * self.oh * self.ow

    @property
    def phase_rows(self) -> tuple[int, int]:
        """Input rows / columns per stride phase (the largest phase), for the input-gradient grid."""
        return cdiv(self.h, self.sh), cdiv(self.w, self.sw)

    def flops_per_sample(self) -> int:
        """Multiply-adds x 2 of the forward (the input gradient costs the same)."""
        return 2 * self.d_out * self.c_in * self.kh * self.kw

    def describe(self) -> str:
        if self.dense:
            return f"Linear({self.d_in} -> {self.c_out})"
        return (
            f"Conv2d({self.c_in}x{self.h}x{self.w} -> {self.c_out}x{self.oh}x{self.ow}, k={self.kh}x{self.kw}, "
            f"s={self.sh}x{self.sw}, p={self.ph}x{self.pw})"
        )


_FIELDS = [f.name for f in dataclasses.fields(LayerSpec)]


def encode_geometry(specs) -> list[int]:
    """The int list the torch ops carry: version, number of layers, then each layer's fields in order."""
    out = [GEOMETRY_VERSION, len(specs)]
    for s in specs:
        out.extend(int(getattr(s, f)) for f in _FIELDS)
    return out


@lru_cache(maxsize=256)
def _decode(geometry: tuple[int, ...]) -> tuple[LayerSpec, ...]:
    if len(geometry) < 2 or geometry[0] != GEOMETRY_VERSION:
        raise ValueError(f"layer geometry: expected version {GEOMETRY_VERSION}, got {geometry[:1]}")
    n, k = geometry[1], len(_FIELDS)
    if len(geometry) != 2 + n * k:
        raise ValueError(f"layer geometry: {n} layers need {2 + n * k} ints, got {len(geometry)}")
    return tuple(LayerSpec(*geometry[2 + i * k : 2 + (i + 1) * k]) for i in range(n))


def decode_geometry(geometry) -> tuple[LayerSpec, ...]:
    """Inverse of ``encode_geometry`` (cached: the ops decode it on every call)."""
    return _decode(tuple(int(v) for v in geometry))


def fused_head(specs) -> bool:
    """Whether the layer before the final Linear(k, 1) runs as the fused head (forward, dz and input gradient in one
    launch): it must be a Linear whose outputs fit one tile, without a residual add."""
    return len(specs) >= 2 and bool(specs[-2].dense) and specs[-2].c_out <= HEAD_MAX_OUT and specs[-2].res_src < 0


def residual_sources(specs) -> dict[int, int]:
    """{j: k} for every residual add (layer k adds the input of layer j)."""
    return {s.res_src: k for k, s in enumerate(specs) if s.res_src >= 0}


def residual_reason(specs) -> str | None:
    """Why the kernels cannot run the chain's residual adds (None if they can, or if there are none)."""
    m, seen = len(specs), set()
    for k, s in enumerate(specs):
        j = s.res_src
        if j < 0:
            continue
        where = f"layer {k} ({s.describe()}) adds the input of layer {j}"
        if k > m - 2:
            return f"{where}: the final Linear(k, 1) cannot take a residual add"
        if j == 0:
            return f"{where}: a residual add from the chain state x (layer 0's input) is not supported"
        if not 1 <= j <= k:
            return f"{where}: expected a source layer 1 <= j <= {k}"
        if j in seen:
            return f"{where}: the input of layer {j} feeds two residual adds (at most one is supported)"
        seen.add(j)
        src = specs[j]
        if s.dense:
            ok = src.h * src.w == 1 and src.d_in == s.d_out
        else:
            ok = not src.dense and (src.c_in, src.h, src.w) == (s.c_out, s.oh, s.ow)
        if not ok:
            shape = f"{src.c_in}x{src.h}x{src.w}"
            out = f"{s.c_out}" if s.dense else f"{s.c_out}x{s.oh}x{s.ow}"
            return (
                f"{where}: its input ({shape}) must have the output's shape ({out}) and storage (both maps or both "
                "flat)"
            )
    return None


def launches_per_step(specs) -> int:
    """Kernel launches of one step: forward and input gradient of every layer before the final Linear(k, 1), one
    launch fewer with the fused head."""
    return 2 * (len(specs) - 1) - (1 if fused_head(specs) else 0)
