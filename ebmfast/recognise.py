"""Recognise what a model computes: the one place that decides whether the chain program (``energy_grad``) and the
layer kernels (``layers``, ``persistent``) can run a model, whatever its classes are called.

    program = recognise(model, x)          # a ``Program``, or a ``str``: why the model is not recognised
    tensors = program.read(model)          # the tensors it uses, read from the live model now

The model's forward is captured once per (model structure, input shape, dtype) with ``torch.export`` (non-strict:
Python runs the forward on fake tensors of ``x``'s shape, so forwards that branch on the input's shape, call
functions, nest or wrap modules are all fine) while the model is in sampling mode (eval). The captured ATen graph is
read off into a small DAG of values: value 0 is the input, every node makes the next value.

- ``Affine``: a convolution (``aten.conv2d``: groups 1, dilation 1, numeric zero padding) or a ``Linear`` (which
  flattens its input). Folded into it at call time: a ``BatchNorm`` in eval mode after it, an average pool (kernel =
  stride, no padding) or a global mean pool in front of it. Its weight is read by attribute path on the live
  model at every call, so in-place optimizer updates and replaced parameters are seen; a parametrized weight
  (``torch.nn.utils.parametrizations.spectral_norm``, ...) is read as the module's effective ``weight``.
- ``Act``: an elementwise activation (``ACTIVATIONS``), from modules, functional calls or tensor methods;
  ``x * sigmoid(x)`` is recognised as swish.
- ``Reshape``: flatten / view / reshape / squeeze / unsqueeze keeping the batch dimension.
- ``Add``: the sum of two values of one shape (residual blocks; the graph is a small DAG).

The output must be one score per sample, (N,) or (N, 1). Anything else gets a reason naming the first op that stopped
the reading. A model's structure (its submodules, their simple attributes such as strides or slopes, parameter
shapes, hooks, a replaced ``forward``) is fingerprinted at every call (``structure_key``); a change drops the cached
captures, so a model changed after its first call is re-captured, never run stale.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import logging
import time
import warnings
import weakref

import torch
from torch import nn

__all__ = [
    "ACTIVATIONS",
    "Affine",
    "Act",
    "Reshape",
    "Add",
    "Program",
    "recognise",
    "structure_key",
    "capture_seconds",
]

ACTIVATIONS = ("identity", "swish", "tanh", "relu", "leaky_relu", "elu", "softplus", "gelu", "gelu_tanh", "sigmoid")

Shape = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class BatchNormFold:
    """An eval-mode batch norm after an affine layer: y = (z - mean) / sqrt(var + eps) * weight + bias."""

    weight: str | None
    bias: str | None
    mean: str
    var: str
    eps: float


@dataclasses.dataclass(frozen=True)
class Affine:
    """A Conv2d (``conv``) or Linear on value ``src``. ``kernel``, ``stride``, ``padding``: the effective convolution
    (an average pool folded in front multiplies them); ``pool``: that pool's kernel; ``global_pool``: a global mean
    over the (H, W) of ``in_shape`` folded in front of a Linear. ``in_shape``: the per-sample shape of ``src``."""

    src: int
    conv: bool
    weight: str
    bias: str | None
    in_shape: Shape
    out_shape: Shape
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    pool: tuple[int, int] | None = None
    global_pool: bool = False
    bn: BatchNormFold | None = None
    where: str = ""

    def describe(self) -> str:
        what = "Conv2d" if self.conv else "Linear"
        extra = [f"pool {self.pool[0]}x{self.pool[1]} folded"] if self.pool else []
        extra += ["global mean folded"] if self.global_pool else []
        extra += ["batch norm folded"] if self.bn else []
        tail = f" ({', '.join(extra)})" if extra else ""
        return f"{what}{self.in_shape}->{self.out_shape}{tail}"


@dataclasses.dataclass(frozen=True)
class Act:
    src: int
    name: str
    param: float = 0.0  # leaky_relu: slope; elu: alpha; softplus: beta


@dataclasses.dataclass(frozen=True)
class Reshape:
    src: int
    shape: Shape


@dataclasses.dataclass(frozen=True)
class Add:
    a: int
    b: int


Node = Affine | Act | Reshape | Add


@dataclasses.dataclass(frozen=True)
class Program:
    """What a model computes per sample: ``nodes`` in order (node i makes value i + 1; value 0 is the input),
    ``shapes[v]`` the per-sample shape of value v, the output being the last value (shape () or (1,))."""

    nodes: tuple[Node, ...]
    shapes: tuple[Shape, ...]

    @functools.cached_property
    def refs(self) -> tuple[str, ...]:
        """Every attribute path the program reads from the model, in a fixed order (``read`` returns them so)."""
        out: list[str] = []
        for node in self.nodes:
            if isinstance(node, Affine):
                names = [node.weight, node.bias]
                if node.bn is not None:
                    names += [node.bn.weight, node.bn.bias, node.bn.mean, node.bn.var]
                out.extend(n for n in names if n is not None and n not in out)
        return tuple(out)

    def read(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The tensors the program uses, read now from the live model (effective weights of parametrized modules)."""
        return {name: read_attr(model, name).detach() for name in self.refs}

    def describe(self) -> str:
        parts = []
        for node in self.nodes:
            if isinstance(node, Affine):
                parts.append(node.describe())
            elif isinstance(node, Act):
                parts.append(node.name + (f"({node.param:g})" if node.name in _PARAM_DEFAULT else ""))
            elif isinstance(node, Add):
                parts.append(f"add(v{node.a}, v{node.b})")
        return " -> ".join(parts)


def read_attr(model: nn.Module, path: str) -> torch.Tensor:
    return functools.reduce(getattr, path.split("."), model)


# --------------------------------------------------------------------------------------------- structure key
_SIMPLE = (int, float, bool, str, type(None))


def _simple(v: object) -> bool:
    return isinstance(v, _SIMPLE) or (isinstance(v, tuple) and all(isinstance(e, _SIMPLE) for e in v))


def structure_key(model: nn.Module) -> tuple:
    """A cheap fingerprint of what decides the captured graph: each submodule (name, identity, class, simple
    attributes such as strides, padding or slopes, a replaced ``forward``, hooks), the names, shapes and dtypes of
    its parameters and buffers. The training flags are left out: a model is always captured in sampling mode."""
    key = []
    for name, m in model.named_modules():
        d = m.__dict__
        attrs = tuple((k, v) for k, v in d.items() if k[0] != "_" and k != "training" and _simple(v))
        tensors = tuple(
            (k, None if t is None else (tuple(t.shape), t.dtype))
            for table in (d["_parameters"], d["_buffers"])
            for k, t in table.items()
        )
        hooks = (len(d["_forward_hooks"]), len(d["_forward_pre_hooks"]), id(d.get("forward")))
        key.append((name, id(m), type(m), attrs, tensors, hooks))
    return tuple(key)


# --------------------------------------------------------------------------------------------- capture and cache
_CACHE: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, dict]] = weakref.WeakKeyDictionary()
_CAPTURE_S: list[float] = []


def capture_seconds() -> list[float]:
    """Wall seconds of every capture so far (``torch.export`` plus the reading), in order."""
    return list(_CAPTURE_S)


def recognise(model: nn.Module, x: torch.Tensor) -> Program | str:
    """The ``Program`` ``model`` computes on inputs like ``x``, or the reason it is not recognised. Cached per model
    (weakly), structure and input shape; the structure is checked at every call."""
    skey = structure_key(model)
    entry = _CACHE.get(model)
    if entry is None or entry[0] != skey:
        entry = (skey, {})
        _CACHE[model] = entry
    key = (tuple(x.shape), x.dtype)
    found = entry[1].get(key)
    if found is None:
        t0 = time.perf_counter()
        found = entry[1][key] = _capture(model, x)
        _CAPTURE_S.append(time.perf_counter() - t0)
    return found


def _capture(model: nn.Module, x: torch.Tensor) -> Program | str:
    from .reference import sampling_mode

    if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[0] < 1:
        return f"inputs must be a batch (N, ...), got {tuple(getattr(x, 'shape', ()))}"
    probe = torch.zeros(x.shape, dtype=x.dtype, device=x.device)
    quiet = logging.getLogger("torch._subclasses.fake_tensor")  # a failing capture is a reason, not a log
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        # export's advice is for export users, and on failure it prints the partial graph to stderr: what matters
        # comes back as a reason
        with sampling_mode(model), torch.enable_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with contextlib.redirect_stderr(io.StringIO()):
                exported = torch.export.export(model, (probe,), strict=False)
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return f"the forward could not be captured by torch.export ({type(exc).__name__}: {msg[:300]})"
    finally:
        quiet.setLevel(level)
    return _read(exported, int(x.shape[0]))


# --------------------------------------------------------------------------------------------- reading the graph
_PARAM_DEFAULT = {"leaky_relu": 0.01, "elu": 1.0, "softplus": 1.0}
_SAME = {"clone", "contiguous", "alias", "dropout", "feature_dropout", "alpha_dropout"}  # the identity while sampling
_RESHAPES = {"flatten", "view", "reshape", "_unsafe_view", "squeeze", "unsqueeze", "_reshape_alias"}
_IGNORED = {"_assert_tensor_metadata", "_assert_scalar", "sym_constrain_range_for_size", "_set_grad_enabled"}


class _Refused(Exception):
    pass


def _args(n: torch.fx.Node) -> dict:
    """The node's arguments by schema name, defaults filled in."""
    schema = n.target._schema
    out = {}
    for i, a in enumerate(schema.arguments):
        if i < len(n.args):
            out[a.name] = n.args[i]
        elif a.name in n.kwargs:
            out[a.name] = n.kwargs[a.name]
        else:
            out[a.name] = a.default_value if a.has_default_value() else None
    return out


def _where(n: torch.fx.Node) -> str:
    stack = n.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path, cls = list(stack.values())[-1]
    cls_name = cls.rsplit(".", 1)[-1] if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
    return f" in {path or 'the model'} ({cls_name})"


def _op(n: torch.fx.Node) -> str:
    name = n.target.overloadpacket.__name__ if hasattr(n.target, "overloadpacket") else str(n.target)
    return name[:-1] if name.endswith("_") and not name.startswith("_") else name


def _shape(n: torch.fx.Node) -> tuple[int, ...]:
    val = n.meta.get("val")
    if not isinstance(val, torch.Tensor):
        raise _Refused(f"{n.target}{_where(n)} does not produce one tensor")
    return tuple(int(s) for s in val.shape)


class _Reader:
    def __init__(self, exported: torch.export.ExportedProgram, batch: int) -> None:
        sig = exported.graph_signature
        self.names = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
        self.inputs = set(sig.user_inputs)
        self.graph = exported.graph
        self.batch = batch
        self.value: dict[torch.fx.Node, int] = {}  # fx node -> value index
        self.raw: list[list] = []  # [kind, fields dict] per value 1..; folded in a second pass
        self.shapes: list[Shape] = []

    # the tensor sources of affine layers -----------------------------------------------------------------------
    def source(self, n: object, what: str, at: torch.fx.Node) -> str | None:
        if n is None:
            return None
        if not isinstance(n, torch.fx.Node):
            raise _Refused(f"{what} of {at.target}{_where(at)} is not a tensor")
        if n.op == "placeholder" and n.name in self.names:
            return self.names[n.name]
        stack = n.meta.get("nn_module_stack") or {}
        for path, _ in reversed(list(stack.values())):
            if ".parametrizations." in path:  # the effective tensor of a parametrized module, read at call time
                owner, _, rest = path.partition(".parametrizations.")
                return f"{owner}.{rest.split('.')[0]}"
        raise _Refused(
            f"{what} of {at.target}{_where(at)} is computed in the forward, not a parameter, buffer or parametrized "
            "weight (the hook-based torch.nn.utils.spectral_norm is such a case; torch.nn.utils.parametrizations."
            "spectral_norm is read)"
        )

    def add(self, kind: str, shape: Shape, **fields: object) -> int:
        self.raw.append([kind, fields])
        self.shapes.append(shape)
        return len(self.raw)

    def affine(self, n: torch.fx.Node, a: dict, src: int, shape: Shape, **fields: object) -> int:
        weight, bias = self.source(a["weight"], "the weight", n), self.source(a["bias"], "the bias", n)
        return self.add("affine", shape, src=src, weight=weight, bias=bias, where=_where(n), **fields)

    def val(self, n: object, at: torch.fx.Node) -> int:
        if not isinstance(n, torch.fx.Node) or n not in self.value:
            raise _Refused(f"{at.target}{_where(at)} combines the input with a tensor that does not depend on it")
        return self.value[n]

    def read(self) -> Program:
        sig_input = [n for n in self.graph.nodes if n.op == "placeholder" and n.name in self.inputs]
        if len(sig_input) != 1:
            raise _Refused(f"the forward must take one tensor, the capture has {len(sig_input)} inputs")
        x = sig_input[0]
        self.value[x] = 0
        in_shape = _shape(x)[1:]
        self.shapes.append(in_shape)
        out = None
        for n in self.graph.nodes:
            if n.op == "output":
                res = n.args[0]
                res = res[0] if isinstance(res, (tuple, list)) and len(res) == 1 else res
                if not isinstance(res, torch.fx.Node) or res not in self.value:
                    raise _Refused("the forward must return one tensor computed from the input")
                out = self.value[res]
            elif n.op == "call_function" and any(a in self.value for a in n.all_input_nodes):
                self.node(n)
        return self.fold(out)

    def node(self, n: torch.fx.Node) -> None:
        op, a = _op(n), _args(n) if hasattr(n.target, "_schema") else {}
        if not a:
            raise _Refused(f"{n.target}{_where(n)} is not an operation the recogniser reads")
        if op in _IGNORED:
            return
        shape = _shape(n)
        if shape[:1] != (self.batch,):
            raise _Refused(f"{op}{_where(n)} changes the batch dimension ({self.batch} -> {shape[:1]})")
        first = next(iter(a.values()))
        if op in _SAME:
            if op.endswith("dropout") and a.get("train"):
                raise _Refused(f"{op}{_where(n)} is active in eval mode")
            self.value[n] = self.val(first, n)
            return
        ps = shape[1:]
        if op == "mul" and n.target._overloadname == "Tensor":
            x, y = a["self"], a["other"]
            for pre, gate in ((x, y), (y, x)):
                if isinstance(gate, torch.fx.Node) and _is_swish_gate(gate) and gate.args[0] is pre:
                    self.value[n] = self.add("act", ps, src=self.val(pre, n), name="swish", param=0.0)
                    return
            raise _Refused(f"mul{_where(n)}: only x * sigmoid(x) (swish) is read as a product")
        src = self.val(first, n)
        if op == "conv2d":
            if n.target._overloadname != "default":
                raise _Refused(f"conv2d with padding={a['padding']!r}{_where(n)}: numeric padding only")
            if list(a["dilation"]) != [1, 1] or a["groups"] != 1:
                raise _Refused(f"conv2d{_where(n)} with dilation {a['dilation']} / groups {a['groups']}: 1 only")
            w = _shape(a["weight"])
            geometry = dict(kernel=(w[2], w[3]), stride=tuple(a["stride"]), padding=tuple(a["padding"]))
            self.value[n] = self.affine(n, a, src, ps, conv=True, **geometry)
        elif op == "linear":
            if len(self.shapes[src]) != 1:
                raise _Refused(f"linear{_where(n)} on a {len(self.shapes[src]) + 1}-D tensor: (N, D) inputs only")
            self.value[n] = self.affine(n, a, src, ps, conv=False)
        elif op == "batch_norm":
            if a["training"]:
                raise _Refused(f"batch_norm{_where(n)} in training mode")
            fold = BatchNormFold(
                self.source(a["weight"], "the weight", n),
                self.source(a["bias"], "the bias", n),
                self.source(a["running_mean"], "the running mean", n),
                self.source(a["running_var"], "the running variance", n),
                float(a["eps"]),
            )
            self.value[n] = self.add("bn", ps, src=src, bn=fold, where=_where(n))
        elif op == "avg_pool2d":
            k = tuple(a["kernel_size"]) * (2 if len(a["kernel_size"]) == 1 else 1)
            s = tuple(a["stride"] or k) * (2 if len(a["stride"] or k) == 1 else 1)
            if s != k or any(a["padding"]) or a["ceil_mode"] or a["divisor_override"] is not None:
                raise _Refused(f"avg_pool2d{_where(n)}: kernel = stride, no padding, no ceil mode or divisor only")
            h, w = self.shapes[src][1:]
            if h % k[0] or w % k[1]:
                raise _Refused(f"avg_pool2d {k[0]}x{k[1]}{_where(n)} on a {h}x{w} map that it does not divide")
            self.value[n] = self.add("pool", ps, src=src, pool=k, where=_where(n))
        elif op in ("adaptive_avg_pool2d", "mean"):
            in_shape = self.shapes[src]
            ok = len(in_shape) == 3 and (
                (op == "adaptive_avg_pool2d" and list(a["output_size"]) == [1, 1])
                or (op == "mean" and a.get("dtype") is None and sorted(d % 4 for d in a["dim"] or []) == [2, 3])
            )
            if not ok:
                raise _Refused(f"{op}{_where(n)}: only a global mean over (H, W) of an (N, C, H, W) map is read")
            self.value[n] = self.add("gpool", ps, src=src, where=_where(n))
        elif op in _RESHAPES:
            self.value[n] = self.add("reshape", ps, src=src, to=ps)
        elif op in ("silu", "tanh", "relu", "gelu", "leaky_relu", "elu", "softplus"):
            name, param = op, _PARAM_DEFAULT.get(op, 0.0)
            if op == "silu":
                name = "swish"
            elif op == "gelu":
                name = "gelu_tanh" if a["approximate"] == "tanh" else "gelu"
            elif op == "leaky_relu":
                param = float(a["negative_slope"])
            elif op == "elu":
                if float(a["scale"]) != 1.0 or float(a["input_scale"]) != 1.0:
                    raise _Refused(f"elu{_where(n)} with scale/input_scale other than 1 (selu/celu)")
                param = float(a["alpha"])
            elif op == "softplus":
                if float(a["threshold"]) != 20.0:
                    raise _Refused(f"softplus{_where(n)} with threshold {a['threshold']} (20 only)")
                param = float(a["beta"])
            self.value[n] = self.add("act", ps, src=src, name=name, param=param)
        elif op == "sigmoid":
            if _is_swish_gate(n):
                return  # read at the mul
            self.value[n] = self.add("act", ps, src=src, name="sigmoid", param=0.0)
        elif op == "add" and n.target._overloadname == "Tensor":
            if a["alpha"] != 1:
                raise _Refused(f"add{_where(n)} with alpha {a['alpha']}")
            other = a["other"]
            b = self.val(other, n)
            if self.shapes[src] != self.shapes[b] or self.shapes[src] != ps:
                raise _Refused(f"add{_where(n)} of shapes {self.shapes[src]} and {self.shapes[b]} (one shape only)")
            self.value[n] = self.add("add", ps, a=src, b=b)
        else:
            raise _Refused(f"{n.target}{_where(n)} is not an operation the chain program runs")

    # folding -----------------------------------------------------------------------------------------------------
    def fold(self, out: int) -> Program:
        raw, shapes = self.raw, self.shapes
        users: dict[int, list[int]] = {}
        for i, (kind, f) in enumerate(raw, start=1):
            for s in (f["a"], f["b"]) if kind == "add" else (f["src"],):
                users.setdefault(s, []).append(i)
        users.setdefault(out, []).append(-1)
        alias: dict[int, int] = {}
        dropped: set[int] = set()
        for i, (kind, f) in enumerate(raw, start=1):
            if kind == "bn":
                s = f["src"]
                if raw[s - 1][0] != "affine" or users[s] != [i] or raw[s - 1][1].get("bn"):
                    raise _Refused(f"batch_norm{f['where']} does not directly follow a Conv2d/Linear it can fold into")
                raw[s - 1][1]["bn"] = f["bn"]
                raw[s - 1][1]["folded_out"] = i
                alias[i] = s
            elif kind in ("pool", "gpool"):
                what = "avg_pool2d" if kind == "pool" else "the global mean"
                targets = []
                for u in users.get(i, []):  # every user: a conv, or reshapes then a Linear
                    between = []
                    while u > 0 and raw[u - 1][0] == "reshape" and len(users.get(u, [])) == 1:
                        between.append(u)
                        u = users[u][0]
                    aff = raw[u - 1][1] if u > 0 and raw[u - 1][0] == "affine" else None
                    ok = aff is not None and not aff.get("pool") and not aff.get("global_pool")
                    ok = ok and (not aff["conv"] if kind == "gpool" else (not aff["conv"] or not between))
                    if not ok:
                        raise _Refused(f"{what}{f['where']} is not followed by a Conv2d/Linear it can fold into")
                    targets.append((aff, between))
                if not targets:
                    raise _Refused(f"{what}{f['where']} is not followed by a Conv2d/Linear it can fold into")
                for aff, between in targets:
                    aff["src"] = f["src"]
                    dropped.update(between)
                    if kind == "gpool":
                        aff["global_pool"] = True
                    else:
                        aff["pool"] = f["pool"]
        # keep the live nodes, renumbered
        live = [i for i, (k, _) in enumerate(raw, start=1) if k not in ("bn", "pool", "gpool") and i not in dropped]
        renum = {0: 0}
        nodes: list[Node] = []
        out_shapes: list[Shape] = [shapes[0]]
        for i in live:
            kind, f = raw[i - 1]
            if kind == "affine":
                src = f["src"]
                in_shape = shapes[src]
                k, s, p = f.get("kernel", (1, 1)), f.get("stride", (1, 1)), f.get("padding", (0, 0))
                pool = f.get("pool")
                if pool is not None and f["conv"]:
                    k = (k[0] * pool[0], k[1] * pool[1])
                    s = (s[0] * pool[0], s[1] * pool[1])
                    p = (p[0] * pool[0], p[1] * pool[1])
                node: Node = Affine(
                    src=renum[_resolve(alias, src)],
                    conv=f["conv"],
                    weight=f["weight"],
                    bias=f["bias"],
                    in_shape=in_shape,
                    out_shape=shapes[i],
                    kernel=k,
                    stride=s,
                    padding=p,
                    pool=pool,
                    global_pool=bool(f.get("global_pool")),
                    bn=f.get("bn"),
                    where=f["where"],
                )
            elif kind == "act":
                node = Act(renum[_resolve(alias, f["src"])], f["name"], f["param"])
            elif kind == "reshape":
                node = Reshape(renum[_resolve(alias, f["src"])], f["to"])
            else:
                node = Add(renum[_resolve(alias, f["a"])], renum[_resolve(alias, f["b"])])
            nodes.append(node)
            out_shapes.append(shapes[i])
            renum[i] = len(nodes)
        last = renum[_resolve(alias, out)]
        if last != len(nodes):  # the output must be the last value (always true for a graph read in order)
            raise _Refused("the output is not the last value computed")
        if shapes[out] not in ((), (1,)):
            raise _Refused(f"the output must be one score per sample, (N,) or (N, 1); got (N, *{shapes[out]})")
        if not any(isinstance(nd, Affine) for nd in nodes):
            raise _Refused("no Conv2d/Linear found")
        return Program(tuple(nodes), tuple(out_shapes))


def _resolve(alias: dict[int, int], v: int) -> int:
    while v in alias:
        v = alias[v]
    return v


def _is_swish_gate(n: torch.fx.Node) -> bool:
    """``n`` is sigmoid(h) whose only users are products h * sigmoid(h)."""
    if _op(n) != "sigmoid" or not n.users:
        return False
    pre = n.args[0]
    for u in n.users:
        if u.op != "call_function" or _op(u) != "mul" or set(u.args[:2]) != {pre, n}:
            return False
    return True


def _read(exported: torch.export.ExportedProgram, batch: int) -> Program | str:
    try:
        return _Reader(exported, batch).read()
    except _Refused as exc:
        return str(exc)


def pool_weight(w: torch.Tensor, node: Affine) -> torch.Tensor:
    """``node``'s weight with its folded pooling: an average pool k x k in front of a conv (or of a Linear over the
    pooled map) is the same layer with each kernel tap repeated k x k times and divided by k*k; a global mean in
    front of a Linear is the Linear over the whole map with its weight divided by H*W."""
    if node.global_pool:
        c, h, wd = node.in_shape
        return (w[:, :, None, None] / (h * wd)).expand(w.shape[0], c, h, wd).reshape(w.shape[0], c * h * wd)
    if node.pool is None:
        return w
    kh, kw = node.pool
    if node.conv:
        full = w
    else:
        c, h, wd = node.in_shape
        full = w.reshape(w.shape[0], c, h // kh, wd // kw)
    full = full.repeat_interleave(kh, dim=2).repeat_interleave(kw, dim=3) / (kh * kw)
    return full if node.conv else full.reshape(w.shape[0], -1)


def affine_tensors(node: Affine, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The effective (weight, bias) of ``node`` from the tensors read at call time: pooling and batch norm folded.
    The weight is contiguous in torch's layout ((O, C, kh, kw) or (O, D), D in NCHW flatten order)."""
    w, b = tensors[node.weight], tensors[node.bias] if node.bias is not None else None
    if node.bn is not None:
        bn = node.bn
        scale = torch.rsqrt(tensors[bn.var] + bn.eps)
        if bn.weight is not None:
            scale = scale * tensors[bn.weight]
        shift = -tensors[bn.mean] * scale if b is None else (b - tensors[bn.mean]) * scale
        b = shift + tensors[bn.bias] if bn.bias is not None else shift
        w = w * scale.reshape(-1, *([1] * (w.dim() - 1)))
    w = pool_weight(w, node)
    return w.contiguous(), b
