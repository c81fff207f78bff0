"""Structure discovery by tracing: which layers of a model form chains of basis paths.

:func:`trace_structure` traces ``apply_fn(params, *inputs)`` with ``jax.make_jaxpr`` and reads the
basis-path structure off the jaxpr, for linen, nnx or plain-function models alike:

1. **Layers.** A ``dot_general`` whose kernel is a parameter of shape ``(in, out)`` contracted on
   its first axis is a Dense layer; a ``conv_general_dilated`` with an ``(*taps, in, out)`` kernel
   (flax's HWIO layout, channels last) is a convolution. The kernel is the parameter leaf itself
   (reshapes and dtype casts allowed); a bias is a per-channel parameter added to the layer output.
2. **Dataflow.** Every value is classified: a *positively homogeneous, channel-wise* function of
   one layer's output (scaling output channel ``j`` of the layer by ``c > 0`` scales channel ``j``
   of the value by ``c`` and nothing else) or not. Homogeneous operations are the bias add, ReLU
   (``max`` with 0, also leaky ReLU via ``select_n``), reshapes that keep the channel axis last, a
   flatten (``(..., H, W, C) -> (..., H*W*C)``: the next Dense layer reads its kernel as
   ``(H, W, C, out)``, positions acting as taps), transposes/slices/pads/concatenations that do not
   touch the channel axis, sum/average/max pooling over positions, ``mean``, multiplication by
   anything that does not depend on layer outputs (constants, dropout masks, per-channel scales),
   dtype casts, and the sum of two homogeneous functions of the same layer. Anything else ends the
   chain: ``tanh``, ``gelu``, ``exp``, products of activations, maxima with non-zero values,
   reductions over channels, normalization, ...
3. **Chains.** Layer ``A`` links to layer ``B`` when every use of ``A``'s output flows, through
   homogeneous operations only, into ``B``'s input and nowhere else. A value that feeds more than
   one consumer (a residual stream, a skip), that is a sum of several branches, or that is a network
   output is a chain boundary. In a ResNet each residual branch (``conv1 -> conv2``, or the three
   convolutions of a bottleneck) becomes its own chain, as in the reference code; the stem, the
   projection shortcuts and the classifier head are single layers.

Policies (documented choices):

* **Single-layer chains go to the fallback.** G-SGD on a lone layer has no hidden nodes and is
  plain SGD, so such a layer is listed in ``structure.fallback`` with the reason it stands alone
  (the reference code trains the stem, shortcut convolutions and the classifier by plain SGD).
* **Normalization** (``normalization=``) is recognised by its arithmetic: a layer output
  multiplied by an ``rsqrt`` of its own statistics (BatchNorm/LayerNorm/GroupNorm/RMSNorm with
  batch statistics) or of running averages. ``"fallback"`` (default, exact): a normalized layer
  output ends its chain. Normalization divides each output channel by its own scale, so the
  channel's incoming weights are scale-invariant on their own and the loss is no longer a function
  of path values; in a BatchNorm ResNet every convolution is then a single layer and G-SGD reduces
  to the fallback optimizer. ``"reference"``: the reference code's treatment: chains run through
  normalization layers as if they were absent (``conv -> BN -> relu -> conv`` is one chain) and
  the normalization scales and offsets are trained by the fallback. This is a heuristic: the
  update is then neither exact in path space nor invariant under rescaling.
* **Unsupported layers** (grouped/depthwise convolutions) and **shared parameters** raise a
  ``ValueError`` naming the parameter; with ``unsupported="fallback"`` they go to the fallback.

Everything ``apply_fn`` returns counts as network output, except that a linen-style
``(y, mutated_collections)`` pair (``model.apply(..., mutable=['batch_stats'])``) counts as ``y``.
Operations that do not contribute to the outputs (dead code, e.g. running-average updates that are
not returned) are ignored.

Limitations: loops and conditionals (``scan``, ``while``, ``cond``) are opaque (layers inside them
are not found, values through them end chains); a Dense layer must be a ``dot_general`` contracting
the last input axis with an ``(in, out)`` kernel and a convolution must be channels-last with a
``(*taps, in, out)`` kernel (other layouts go to the fallback with a note); a GroupNorm with several
groups reshapes the channel axis and ends the chain even under ``normalization="reference"``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Callable, Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from gsgd_jax._tree import Path, leaves_with_paths, path_str
from gsgd_jax.structure import BasisPathStructure, Chain, Layer, with_skeleton

__all__ = ["trace_structure", "trace_nnx_structure", "trace_report"]

Normalization = Literal["fallback", "reference"]
Unsupported = Literal["error", "fallback"]

# Higher-order primitives whose sub-jaxpr is inlined (same inputs and outputs as the equation).
_INLINE = frozenset({
    "pjit", "jit", "closed_call", "core_call", "named_call", "custom_jvp_call", "custom_vjp_call",
    "custom_vjp_call_jaxpr", "remat", "remat2", "checkpoint",
})
_SUBJAXPR_KEYS = ("jaxpr", "call_jaxpr", "fun_jaxpr")

# Operations that move or copy data without arithmetic (kept by parameter views and layer outputs).
_CASTS = frozenset({"convert_element_type", "copy", "copy_p", "reduce_precision"})
_COMPARE = frozenset({"gt", "ge", "lt", "le", "eq", "ne"})
_REDUCE = frozenset({"reduce_sum", "reduce_max", "reduce_min"})
_POOL = frozenset({"reduce_window_sum", "reduce_window_max", "reduce_window_min"})
_CUMULATIVE = frozenset({"cumsum", "cummax", "cummin"})
_POWER = frozenset({"integer_pow", "square", "pow"})
_NORMALIZERS = frozenset({"rsqrt", "sqrt"})
# Primitives after which a non-homogeneous value keeps the description of where it came from.
_TRANSPARENT = (_CASTS | _REDUCE | _POOL | _CUMULATIVE | {
    "reshape", "squeeze", "expand_dims", "broadcast_in_dim", "transpose", "slice", "pad",
    "concatenate", "rev", "neg", "abs", "max", "min", "select_n", "mul", "div"})
_FOLD_LIMIT = 1 << 16  # largest constant (elements) folded while tracing


# ------------------------------------------------------------------------------------------------
# Flattened graph: the jaxpr with higher-order primitives inlined
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Node:
  prim: Any
  params: dict
  ins: list[int]
  outs: list[int]
  scope: str  # names of the enclosing calls, e.g. "gelu"

  @property
  def name(self) -> str:
    return self.prim.name

  def label(self) -> str:
    return f"{self.name} (in {self.scope})" if self.scope else self.name


class _Graph:
  """All values of a traced function as integer ids, with their shapes, dtypes and constants."""

  def __init__(self):
    self.shapes: list[tuple[int, ...]] = []
    self.dtypes: list[Any] = []
    self.consts: dict[int, np.ndarray] = {}
    self.nodes: list[_Node] = []

  def new(self, aval, const=None) -> int:
    self.shapes.append(tuple(getattr(aval, "shape", ())))
    self.dtypes.append(getattr(aval, "dtype", None))
    i = len(self.shapes) - 1
    if const is not None:
      self.consts[i] = const
    return i

  def inline(self, jaxpr, consts, in_ids: Sequence[int], scope: tuple[str, ...]) -> list[int]:
    env: dict[Any, int] = {}
    for v, c in zip(jaxpr.constvars, consts):
      env[v] = self.new(v.aval, _as_const(c))
    for v, i in zip(jaxpr.invars, in_ids):
      env[v] = i

    def read(x):
      if isinstance(x, jcore.Literal):
        return self.new(x.aval, _as_const(x.val))
      return env[x]

    for eqn in jaxpr.eqns:
      ins = [read(x) for x in eqn.invars]
      sub = _sub_jaxpr(eqn)
      if sub is not None:
        name = eqn.params.get("name")
        inner = scope + ((str(name),) if name else ())
        outs = self.inline(sub[0], sub[1], ins, inner)
        for v, o in zip(eqn.outvars, outs):
          env[v] = o
        continue
      outs = [self.new(v.aval) for v in eqn.outvars]
      for v, o in zip(eqn.outvars, outs):
        env[v] = o
      self.nodes.append(_Node(eqn.primitive, dict(eqn.params), ins, outs, "/".join(scope)))
    return [read(v) for v in jaxpr.outvars]


def _as_const(x) -> np.ndarray | None:
  try:
    a = np.asarray(x)
  except Exception:  # noqa: BLE001 - opaque constants (e.g. PRNG keys) are just unknown values
    return None
  return a if a.dtype != object and a.size <= _FOLD_LIMIT else None


def _sub_jaxpr(eqn):
  """``(jaxpr, consts)`` to inline for a call-like higher-order primitive, else ``None``."""
  if eqn.primitive.name not in _INLINE:
    return None
  for key in _SUBJAXPR_KEYS:
    sub = eqn.params.get(key)
    if isinstance(sub, jcore.ClosedJaxpr):
      jaxpr, consts = sub.jaxpr, sub.consts
    elif isinstance(sub, jcore.Jaxpr):
      jaxpr, consts = sub, ()
    else:
      continue
    if len(jaxpr.invars) == len(eqn.invars) and len(jaxpr.outvars) == len(eqn.outvars):
      return jaxpr, consts
  return None


def _live_nodes(graph: _Graph, outputs: Sequence[int]) -> list[_Node]:
  live = set(outputs)
  keep = []
  for node in reversed(graph.nodes):
    if any(o in live for o in node.outs):
      keep.append(node)
      live.update(node.ins)
  return keep[::-1]


# ------------------------------------------------------------------------------------------------
# The lattice of value kinds
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Val:
  """What a value is, as far as the positive scaling group of hidden channels is concerned.

  kind:
    ``const``: a known constant; ``free``: depends on no parameter and no layer output (inputs,
    random masks); ``param``: depends on parameters that are not layer outputs (e.g. a
    normalization scale); ``hom``: a positively homogeneous, channel-wise function of the output of
    layer ``layer`` (channels on the last axis, or flattened with positions ``flat``);
    ``pattern``: a scale-invariant function of layer outputs (a sign pattern); ``stat``: a
    statistic of layer outputs (mean of squares, variance, ...); ``centered``: a homogeneous value
    plus an offset, waiting for a normalization (``normalization='reference'`` only); ``mixed``:
    anything else that depends on layer outputs.
  """

  kind: str
  const: np.ndarray | None = None
  view: tuple | None = None  # (param path, row-major copy of the leaf, axis of a vector leaf)
  params: frozenset = frozenset()
  layers: frozenset = frozenset()
  layer: int | None = None
  flat: tuple[int, ...] | None = None
  normalized: bool = False
  norm: bool = False  # computed through rsqrt/sqrt: a normalizer
  why: str = ""       # mixed: what the value is, for messages
  pending: tuple[str, str] | None = None  # centered: the chain end if no normalization follows
  unsupported: str | None = None  # output of an unsupported layer (its name), before its bias

  @property
  def invariant(self) -> bool:
    """Does not change under the scaling group (may multiply a homogeneous value)."""
    return self.kind in ("const", "free", "param", "pattern")


_FREE = _Val("free")


def _deps(v: _Val) -> frozenset:
  """The layers whose outputs ``v`` depends on."""
  return v.layers | {v.layer} if v.layer is not None else v.layers


def _is_zero(v: _Val) -> bool:
  return v.kind == "const" and v.const is not None and not np.any(v.const)


def _is_float(dtype) -> bool:
  try:
    return jnp.issubdtype(dtype, jnp.inexact)
  except TypeError:
    return False


# ------------------------------------------------------------------------------------------------
# Records
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _LayerRec:
  kernel: Path
  shape: tuple[int, ...]
  kind: str               # "dense" | "conv"
  lhs: _Val
  bias: Path | None = None
  excluded: str | None = None

  @property
  def name(self) -> str:
    return _layer_name(self.kernel)


def _layer_name(kernel: Path) -> str:
  """``('block1', 'conv1', 'kernel')`` -> ``'block1/conv1'``."""
  return path_str(kernel[:-1]) if len(kernel) > 1 and kernel[-1] == "kernel" else path_str(kernel)


@dataclasses.dataclass
class _Trace:
  """Everything the dataflow pass found; turned into a structure by :func:`_build`."""

  paths: list[Path]
  shapes: dict[Path, tuple[int, ...]]
  normalization: str
  unsupported: str
  layers: list[_LayerRec] = dataclasses.field(default_factory=list)
  terminals: dict[int, list[tuple[str, Any]]] = dataclasses.field(default_factory=dict)
  roles: dict[Path, list[tuple[str, Any]]] = dataclasses.field(default_factory=dict)
  normalized: set[int] = dataclasses.field(default_factory=set)

  def end(self, layer: int, kind: str, detail: Any = "") -> None:
    self.terminals.setdefault(layer, []).append((kind, detail))

  def role(self, v: _Val, kind: str, detail: Any = "") -> None:
    if v.view is not None:
      self.roles.setdefault(v.view[0], []).append((kind, detail))


# ------------------------------------------------------------------------------------------------
# The dataflow pass
# ------------------------------------------------------------------------------------------------

class _Analysis:
  """Forward pass over the live nodes, one rule per primitive family."""

  def __init__(self, graph: _Graph, trace: _Trace):
    self.g = graph
    self.t = trace
    self.vals: dict[int, _Val] = {}
    self.reference = trace.normalization == "reference"

  # -- helpers ----------------------------------------------------------------------------------
  def val(self, i: int) -> _Val:
    if i in self.vals:
      return self.vals[i]
    if i in self.g.consts and self.g.consts[i] is not None:
      return _Val("const", const=self.g.consts[i])
    return _FREE

  def shape(self, i: int) -> tuple[int, ...]:
    return self.g.shapes[i]

  def consume(self, v: _Val, kind: str, detail: Any, node: _Node) -> None:
    """``v`` is used in a way that is not homogeneous for its layer: record the chain end."""
    if v.kind == "hom":
      self.t.end(v.layer, kind, detail)
    elif v.kind == "centered":
      self.t.end(v.layer, *v.pending)
    elif v.kind == "stat" and self.reference:
      where = node.label() if node is not None else "a network output"
      for a in v.layers:
        self.t.end(a, "op", f"{where} (of its statistics)")

  def generic(self, node: _Node, ins: list[_Val], kind: str = "op", detail: str | None = None,
              why: str | None = None) -> list[_Val]:
    """Default rule: every homogeneous input ends its chain; parameters are used outside layers."""
    detail = node.label() if detail is None else detail
    kinds = {v.kind for v in ins}
    escapes = bool(kinds & {"hom", "centered", "mixed"})  # the result is not a statistic
    for v in ins:
      if v.kind != "stat" or escapes:
        self.consume(v, kind, detail, node)
      self.t.role(v, "other", node.label())
    layers = frozenset().union(*[_deps(v) for v in ins])
    params = frozenset().union(*[v.params for v in ins])
    # rsqrt is the normalization arithmetic of flax's norm layers (also with running averages);
    # sqrt counts when it is not a plain constant such as jnp.sqrt(2.0).
    norm = (any(v.norm for v in ins) or node.name == "rsqrt"
            or (node.name == "sqrt" and not kinds <= {"const"}))
    if norm and layers and node.name in _NORMALIZERS | {"mul", "div"}:
      self.t.normalized.update(layers)
    if kinds <= {"const"}:
      folded = self.fold(node, ins)
      if folded is not None:
        return [dataclasses.replace(f, norm=norm) for f in folded]
      return [_Val("free", norm=norm) for _ in node.outs]
    if escapes:
      normalized = any(v.normalized for v in ins) or (norm and bool(layers))
      if why is None and normalized:
        why = "a normalized value (normalization layer)"
      elif why is None:
        mixed = [v.why for v in ins if v.kind == "mixed" and v.why]
        why = mixed[0] if (mixed and node.name in _TRANSPARENT) else f"the result of {node.label()}"
      return [_Val("mixed", params=params, layers=layers, norm=norm, why=why,
                   normalized=normalized) for _ in node.outs]
    if "stat" in kinds:
      return [_Val("stat", params=params, layers=layers, norm=norm) for _ in node.outs]
    if "pattern" in kinds:
      return [_Val("pattern", params=params, layers=layers, norm=norm) for _ in node.outs]
    if "param" in kinds:
      return [_Val("param", params=params, norm=norm) for _ in node.outs]
    return [_Val("free", norm=norm) for _ in node.outs]

  def fold(self, node: _Node, ins: list[_Val]) -> list[_Val] | None:
    if any(v.const is None for v in ins):
      return None
    if sum(math.prod(self.shape(o)) for o in node.outs) > _FOLD_LIMIT:
      return None
    try:
      with jax.ensure_compile_time_eval():
        out = node.prim.bind(*[jnp.asarray(v.const) for v in ins], **node.params)
    except Exception:  # noqa: BLE001 - anything we cannot evaluate is an unknown constant
      return None
    out = out if node.prim.multiple_results else [out]
    res = []
    for o in out:
      c = _as_const(o)
      res.append(_Val("const", const=c) if c is not None else _FREE)
    return res

  # -- the pass ---------------------------------------------------------------------------------
  def run(self, nodes: list[_Node], param_ids: list[int], outputs: list[int]) -> None:
    for p, i in zip(self.t.paths, param_ids):
      shape = self.t.shapes[p]
      nonunit = [a for a, n in enumerate(shape) if n != 1]
      axis = nonunit[0] if len(nonunit) == 1 else None
      self.vals[i] = _Val("param", view=(p, True, axis), params=frozenset([p]))
    for node in nodes:
      ins = [self.val(i) for i in node.ins]
      outs = self.step(node, ins)
      for o, v in zip(node.outs, outs):
        self.vals[o] = v
    for i in outputs:
      v = self.val(i)
      self.consume(v, "output", "", None)
      self.t.role(v, "other", "returned as an output")

  def step(self, node: _Node, ins: list[_Val]) -> list[_Val]:
    name = node.name
    if all(v.kind == "const" for v in ins):
      return self.generic(node, ins)
    if name in ("dot_general", "conv_general_dilated"):
      return self.kernel_op(node, ins)
    if len(ins) == 1 and len(node.outs) == 1:
      v = ins[0]
      if v.view is not None and name in _CASTS | {"reshape", "squeeze", "broadcast_in_dim",
                                                    "expand_dims", "transpose"}:
        out = self.view_op(node, v)
        if out is not None:
          return [out]
      if v.kind in ("hom", "centered") and _is_float(self.g.dtypes[node.outs[0]]):
        out = self.hom_unary(node, v)
        if out is not None:
          return [out]
    if name in ("add", "sub", "add_any"):
      return [self.add(node, ins)]
    if name in ("mul", "div"):
      return [self.mul(node, ins)]
    if name in ("max", "min"):
      return [self.maxmin(node, ins)]
    if name in _COMPARE:
      return self.compare(node, ins)
    if name == "select_n":
      return self.select(node, ins)
    if name == "pad":
      return self.pad(node, ins)
    if name == "concatenate":
      return self.concatenate(node, ins)
    if name in _POWER:
      return self.power(node, ins)
    return self.generic(node, ins)

  # -- parameter views --------------------------------------------------------------------------
  def view_op(self, node: _Node, v: _Val) -> _Val | None:
    p, identity, axis = v.view
    in_shape, out_shape = self.shape(node.ins[0]), self.shape(node.outs[0])
    name = node.name
    n = math.prod(self.t.shapes[p])
    if name in _CASTS:
      return v
    if name in ("reshape", "squeeze", "expand_dims"):
      nonunit = [a for a, k in enumerate(out_shape) if k != 1]
      axis = nonunit[0] if (len(nonunit) == 1 and out_shape[nonunit[0]] == n) else None
      return dataclasses.replace(v, view=(p, identity, axis))
    if name == "broadcast_in_dim":
      dims = tuple(node.params["broadcast_dimensions"])
      new_axis = dims[axis] if axis is not None else None
      return dataclasses.replace(v, view=(p, identity and out_shape == in_shape, new_axis))
    if name == "transpose":
      perm = tuple(node.params["permutation"])
      new_axis = perm.index(axis) if axis is not None else None
      return dataclasses.replace(v, view=(p, identity and perm == tuple(range(len(perm))),
                                          new_axis))
    return None

  # -- unary operations on homogeneous values ---------------------------------------------------
  def hom_unary(self, node: _Node, v: _Val) -> _Val | None:
    name = node.name
    in_shape, out_shape = self.shape(node.ins[0]), self.shape(node.outs[0])
    last = len(in_shape) - 1
    if name in _CASTS or name in ("neg", "abs"):
      return v
    if v.kind == "centered" and name not in ("reshape", "squeeze", "expand_dims",
                                             "broadcast_in_dim"):
      return None
    if name in ("reshape", "squeeze", "expand_dims"):
      if node.params.get("dimensions") is not None:  # a transposing reshape
        return None
      flat = _reshape_channels(in_shape, out_shape, v.flat)
      if flat is False:
        return self._mixes_channels(node, v)
      return dataclasses.replace(v, flat=flat)
    if name == "broadcast_in_dim":
      dims = tuple(node.params["broadcast_dimensions"])
      if dims and dims[-1] == len(out_shape) - 1 and out_shape[-1] == in_shape[-1]:
        return v
      return None
    if name == "transpose":
      return v if tuple(node.params["permutation"])[-1] == last else None
    if name in _REDUCE:
      axes = tuple(node.params["axes"])
      if last not in axes and len(out_shape) >= 1:
        return v
      if self.reference and v.kind == "hom" and name == "reduce_sum":  # LayerNorm-type mean
        return _Val("stat", layers=frozenset([v.layer]))
      return self._mixes_channels(node, v)
    if name in _CUMULATIVE:
      return v if node.params.get("axis") != last else None
    if name in _POOL:
      ok = (node.params["window_dimensions"][-1] == 1 and node.params["window_strides"][-1] == 1
            and tuple(node.params["padding"][-1]) == (0, 0)
            and node.params.get("base_dilation", (1,) * (last + 1))[-1] == 1)
      return v if ok else self._mixes_channels(node, v)
    if name == "slice":
      start, limit = node.params["start_indices"], node.params["limit_indices"]
      strides = node.params.get("strides") or (1,) * len(start)
      ok = start[-1] == 0 and limit[-1] == in_shape[-1] and strides[-1] == 1
      return v if ok else None
    if name == "rev":
      return v if last not in tuple(node.params["dimensions"]) else None
    if name == "sign":
      return _Val("pattern", layers=frozenset([v.layer]))
    return None

  def _mixes_channels(self, node: _Node, v: _Val) -> _Val:
    self.consume(v, "mix", node.label(), node)
    return _Val("mixed", layers=_deps(v), why=f"the result of {node.label()} across channels")

  # -- binary operations ------------------------------------------------------------------------
  def _aligned(self, node: _Node, v_id: int) -> bool:
    """Elementwise with broadcasting that never spreads one channel over several."""
    s, o = self.shape(v_id), self.shape(node.outs[0])
    return len(s) == len(o) and len(s) >= 1 and s[-1] == o[-1]

  def _bias_like(self, node: _Node, v: _Val, v_id: int, channels: int) -> bool:
    """A per-channel parameter vector broadcast along the channel axis."""
    if v.view is None:
      return False
    p, _, axis = v.view
    if math.prod(self.t.shapes[p]) != channels:
      return False
    if channels == 1:
      return True
    out_rank, v_rank = len(self.shape(node.outs[0])), len(self.shape(v_id))
    return axis is not None and axis + (out_rank - v_rank) == out_rank - 1

  def add(self, node: _Node, ins: list[_Val]) -> _Val:
    homs = [k for k, v in enumerate(ins) if v.kind in ("hom", "centered")]
    if not homs:
      branches = [v for v in ins if v.kind == "mixed"]
      why = None
      if len(branches) == 2:
        why = "a sum of several branches (a residual stream)"
      elif branches:
        why = branches[0].why
      out = self.generic(node, ins, why=why)[0]
      if any(v.normalized for v in ins):  # e.g. normalized * scale + offset
        self._relabel(ins, "norm_offset")
      unsupported = [v.unsupported for v in ins if v.unsupported]
      if unsupported and any(v.view is not None for v in ins):
        self._relabel(ins, "unsupported_bias", unsupported[0])
        return dataclasses.replace(out, unsupported=None)
      return out
    if len(homs) == 2:
      (ia, ib), (va, vb) = node.ins, ins
      if (va.kind == vb.kind == "hom" and va.layer == vb.layer and va.flat == vb.flat
          and self._aligned(node, ia) and self._aligned(node, ib)):
        return dataclasses.replace(va, normalized=va.normalized and vb.normalized)
      for v in (va, vb):
        self.consume(v, "sum", "", node)
      return _Val("mixed", layers=_deps(va) | _deps(vb),
                  why="a sum of several branches (a residual stream)")
    k = homs[0]
    h, ih = ins[k], node.ins[k]
    other, io = ins[1 - k], node.ins[1 - k]
    if not self._aligned(node, ih):
      return self.generic(node, ins, "mix")[0]
    if _is_zero(other):
      return h
    channels = self.shape(ih)[-1]
    if h.kind == "hom" and h.flat is None and self._bias_like(node, other, io, channels):
      rec = self.t.layers[h.layer]
      if h.normalized:
        self.t.role(other, "norm_offset", h.layer)
        return h
      if rec.bias is None:
        rec.bias = other.view[0]
        self.t.role(other, "bias", h.layer)
        return h
    self.t.role(other, "other", node.label())
    if h.kind == "hom" and self.reference and (
        other.kind in ("const", "free", "param")
        or (other.kind == "stat" and other.layers <= {h.layer})):
      # x - mean with a mean that is not a function of x (running average, LayerNorm mean):
      # wait for the normalization that should follow.
      pending = ("sum", "") if other.kind == "free" else ("offset", node.label())
      return dataclasses.replace(h, kind="centered", pending=pending)
    if other.kind in ("const", "param", "stat") or _deps(other) <= {h.layer}:
      self.consume(h, "offset", node.label(), node)
      self.consume(other, "offset", node.label(), node)
      return _Val("mixed", layers=frozenset([h.layer]) | other.layers, params=other.params,
                  why=f"the result of {node.label()}", normalized=h.normalized)
    self.consume(h, "sum", "", node)
    self.consume(other, "sum", "", node)
    return _Val("mixed", layers=frozenset([h.layer]) | other.layers, params=other.params,
                why="a sum of several branches (a residual stream)")

  def _relabel(self, ins: list[_Val], kind: str, detail: Any = None) -> None:
    """Turns the 'other' role just given to parameter views in ``ins`` into ``kind``."""
    for v in ins:
      if v.view is not None and self.t.roles.get(v.view[0]):
        self.t.roles[v.view[0]][-1] = (kind, detail)

  def mul(self, node: _Node, ins: list[_Val]) -> _Val:
    div = node.name == "div"
    homs = [(i, v) for i, v in zip(node.ins, ins) if v.kind in ("hom", "centered")]
    if not homs:
      out = self.generic(node, ins)[0]
      if any(v.norm or v.normalized for v in ins):  # rsqrt(var + eps) * scale
        self._relabel(ins, "norm_scale")
      return out
    if len(homs) == 2 or (div and ins[1].kind in ("hom", "centered")):
      if not div and len(homs) == 2 and homs[0][1].layer == homs[1][1].layer:
        return self.power(node, ins)[0]
      for _, v in homs:
        self.consume(v, "mul", "", node)
      return _Val("mixed", layers=frozenset().union(*[_deps(v) for _, v in homs]),
                  why=f"a product of activations ({node.label()})")
    (ih, h), = homs
    other = ins[1] if node.ins[0] == ih else ins[0]
    if not self._aligned(node, ih):
      return self.generic(node, ins, "mix")[0]
    if other.norm and (other.invariant or (other.kind == "stat" and other.layers <= {h.layer})):
      # A normalization: the layer output divided by its own scale.
      self.t.normalized.add(h.layer)
      self.t.role(other, "norm_scale", h.layer)
      if self.reference:
        return dataclasses.replace(h, kind="hom", normalized=True, pending=None)
      self.consume(h, "norm", "", node)
      return _Val("mixed", layers=frozenset([h.layer]) | other.layers, params=other.params,
                  why="a normalized value (normalization layer)", normalized=True)
    if other.invariant:
      self.t.role(other, "norm_scale" if h.normalized else "scale", h.layer)
      return h
    if other.kind == "mixed" and _deps(other) - {h.layer}:
      self.consume(h, "mul", "", node)
      self.consume(other, "mul", "", node)
      return _Val("mixed", layers=_deps(other) | {h.layer}, params=other.params,
                  why=f"a product of activations ({node.label()})")
    return self.generic(node, ins)[0]

  def power(self, node: _Node, ins: list[_Val]) -> list[_Val]:
    """Squares of a layer output: statistics (variance) of that layer."""
    homs = [v for v in ins if v.kind in ("hom", "centered")]
    if not homs or any(v.kind not in ("hom", "centered", "const") for v in ins):
      return self.generic(node, ins)
    if not self.reference:
      for v in homs:
        self.consume(v, "op", node.label(), node)
    return [_Val("stat", layers=frozenset(v.layer for v in homs))]

  def maxmin(self, node: _Node, ins: list[_Val]) -> _Val:
    homs = [(i, v) for i, v in zip(node.ins, ins) if v.kind == "hom"]
    if len(homs) == 1:
      (ih, h), = homs
      other = ins[1] if ins[0] is h else ins[0]
      if _is_zero(other) and self._aligned(node, ih):
        return h  # ReLU
    if len(homs) == 2 and homs[0][1].layer == homs[1][1].layer and \
        homs[0][1].flat == homs[1][1].flat and all(self._aligned(node, i) for i, _ in homs):
      return homs[0][1]  # e.g. max(x, 0.1 x)
    detail = f"{node.name} with a non-zero value" if len(homs) == 1 else node.label()
    return self.generic(node, ins, "op", detail)[0]

  def compare(self, node: _Node, ins: list[_Val]) -> list[_Val]:
    homs = [v for v in ins if v.kind == "hom"]
    others = [v for v in ins if v.kind != "hom"]
    if homs and (all(_is_zero(v) for v in others)) and len({v.layer for v in homs}) == 1:
      return [_Val("pattern", layers=frozenset([homs[0].layer]))]
    return self.generic(node, ins)

  def select(self, node: _Node, ins: list[_Val]) -> list[_Val]:
    pred, cases = ins[0], ins[1:]
    homs = [v for v in cases if v.kind == "hom"]
    if (pred.invariant and homs and len({(v.layer, v.flat) for v in homs}) == 1
        and all(v.kind == "hom" or _is_zero(v) for v in cases)
        and all(self._aligned(node, i) for i, v in zip(node.ins[1:], cases) if v.kind == "hom")):
      return [dataclasses.replace(homs[0], normalized=all(v.normalized for v in homs))]
    return self.generic(node, ins)

  def pad(self, node: _Node, ins: list[_Val]) -> list[_Val]:
    x, value = ins
    channel_padding = tuple(node.params["padding_config"][-1])
    if x.kind == "hom" and _is_zero(value) and channel_padding == (0, 0, 0):
      return [x]
    return self.generic(node, ins)

  def concatenate(self, node: _Node, ins: list[_Val]) -> list[_Val]:
    homs = [v for v in ins if v.kind == "hom"]
    last = len(self.shape(node.outs[0])) - 1
    if (homs and node.params["dimension"] != last and len({(v.layer, v.flat) for v in homs}) == 1
        and all(v.kind == "hom" or _is_zero(v) for v in ins)):
      return [homs[0]]
    return self.generic(node, ins)

  # -- layers -----------------------------------------------------------------------------------
  def kernel_op(self, node: _Node, ins: list[_Val]) -> list[_Val]:
    lhs, rhs = ins
    name = node.name
    kernel = rhs.view[0] if rhs.view is not None else None
    identity = rhs.view is not None and rhs.view[1] and \
        self.shape(node.ins[1]) == self.t.shapes.get(kernel)
    if not identity:
      return self.generic(node, ins, "op", node.label())
    shape = self.t.shapes[kernel]
    problem = None
    if name == "dot_general":
      (lc, rc), (lb, rb) = node.params["dimension_numbers"]
      lhs_rank = len(self.shape(node.ins[0]))
      if len(shape) != 2 or tuple(rc) != (0,) or tuple(lc) != (lhs_rank - 1,) or lb or rb:
        problem = (f"dot_general with kernel {shape} is not a Dense (in, out) layer "
                   f"(contracting {tuple(lc)} x {tuple(rc)}, batch {tuple(lb)} x {tuple(rb)})")
      kind = "dense"
    else:
      nd = len(shape)
      groups = node.params.get("feature_group_count", 1), node.params.get("batch_group_count", 1)
      dn = node.params["dimension_numbers"]
      lhs_spec, rhs_spec, out_spec = tuple(dn.lhs_spec), tuple(dn.rhs_spec), tuple(dn.out_spec)
      if groups != (1, 1):
        problem = (f"grouped/depthwise convolution (feature_group_count={groups[0]}, "
                   f"batch_group_count={groups[1]}): its edges are not (tap, in, out) entries "
                   "of one channel graph")
        if self.t.unsupported == "error":
          raise ValueError(
              f"Parameter {path_str(kernel)!r} is the kernel of a {problem}. G-space does not "
              "cover it. Pass unsupported='fallback' to trace_structure to train it outside "
              "G-space (with the fallback optimizer), or build the structure by hand with "
              "gsgd_jax.chain_structure.")
      elif (rhs_spec != (nd - 1, nd - 2) + tuple(range(nd - 2)) or lhs_spec[1] != nd - 1
            or out_spec[1] != nd - 1):
        problem = (f"convolution layout is not channels-last with a (*taps, in, out) kernel "
                   f"(lhs_spec={lhs_spec}, rhs_spec={rhs_spec}, out_spec={out_spec})")
      kind = "conv"
    if problem is not None:
      self.t.role(rhs, "unsupported", problem)
      self.t.role(lhs, "other", node.label())
      name = _layer_name(kernel)
      self.consume(lhs, "unsupported", name, node)
      layers = _deps(lhs)
      if layers:
        return [_Val("mixed", layers=layers, unsupported=name,
                     why=f"the output of an unsupported layer ({name})")]
      return [_Val("param", params=lhs.params | {kernel}, unsupported=name)]
    idx = len(self.t.layers)
    self.t.layers.append(_LayerRec(kernel, shape, kind, lhs))
    self.t.role(rhs, "kernel", idx)
    if lhs.kind == "hom" and (kind == "dense" or lhs.flat is None):
      self.t.end(lhs.layer, "layer", idx)
    else:
      self.consume(lhs, "layer", idx, node)
      self.t.role(lhs, "other", f"input of layer {path_str(kernel)}")
    return [_Val("hom", layer=idx)]


def _reshape_channels(in_shape, out_shape, flat):
  """New ``flat`` after a reshape of a channels-last value, or ``False`` if channels get mixed."""
  if not in_shape or not out_shape:
    return False
  last = in_shape[-1]
  if out_shape[-1] == last:
    return flat  # leading axes regrouped, the last axis untouched
  if flat is not None:
    return False
  lead = math.prod(out_shape[:-1])
  for k in range(len(in_shape) - 1, -1, -1):  # fewest position axes first
    if math.prod(in_shape[:k]) == lead and math.prod(in_shape[k:]) == out_shape[-1]:
      return tuple(in_shape[k:-1]) if k < len(in_shape) - 1 else flat
  return False


# ------------------------------------------------------------------------------------------------
# From the dataflow facts to a structure
# ------------------------------------------------------------------------------------------------

_NOUN = {
    "output": "a network output",
    "sum": "a residual sum",
    "mul": "a product with another activation",
    "norm": "a normalization",
}


def _end_reason(t: _Trace, a: int) -> str:
  terms = list(dict.fromkeys(t.terminals.get(a, [])))
  if a in t.normalized and t.normalization == "fallback":
    kept = [x for x in terms if x[0] in ("layer", "output", "sum", "mul", "unsupported")]
    terms = kept + [("norm", "")]
  if not terms:
    return "its output is not used"

  def noun(kind, detail):
    if kind == "layer":
      return t.layers[detail].name
    if kind in ("op", "offset"):
      return str(detail)
    if kind == "mix":
      return f"{detail} (mixes channels)"
    if kind == "unsupported":
      return f"the unsupported layer {detail}"
    return _NOUN[kind]

  if len(terms) > 1:
    return f"its output feeds {len(terms)} consumers: " + ", ".join(noun(*x) for x in terms)
  kind, detail = terms[0]
  if kind == "layer":
    return f"its output feeds {t.layers[detail].name}, which is outside G-space"
  if kind == "output":
    return "its output is a network output"
  if kind == "sum":
    return "its output is summed with another branch (residual add)"
  if kind == "mul":
    return "its output is multiplied by another activation"
  if kind == "norm":
    return ("its output is normalized (BatchNorm/LayerNorm/GroupNorm-like), which makes the "
            "incoming weights of each channel scale-invariant on their own")
  if kind == "mix":
    return f"{detail} mixes its output channels"
  if kind == "offset":
    return f"its output gets a constant offset ({detail})"
  if kind == "unsupported":
    return f"its output feeds the unsupported layer {detail}"
  return f"not positively homogeneous after it: {detail}"


def _start_reason(t: _Trace, b: int) -> str:
  lhs = t.layers[b].lhs
  if lhs.kind == "hom":
    a = t.layers[lhs.layer]
    if a.excluded:
      return f"its input comes from {a.name}, which is outside G-space"
    if lhs.flat is not None and t.layers[b].kind != "dense":
      return "its input is a flattened feature map"
    return f"its input is also used elsewhere ({a.name} output feeds several consumers)"
  if lhs.kind == "centered":
    return ("its input is a layer output plus an offset" if lhs.pending[0] == "offset"
            else "its input is a sum of several branches (a residual stream)")
  if lhs.kind in ("free", "const"):
    return "its input is the network input"
  if lhs.kind == "param":
    return "its input is computed from parameters only"
  if lhs.kind in ("stat", "pattern"):
    return "its input is computed from statistics of other layers"
  return f"its input is {lhs.why or 'not a homogeneous function of one layer'}"


_ROLE_NOTE = {
    "scale": "a per-channel scale on the output of {}",
    "norm_scale": "normalization scale (BatchNorm/LayerNorm-like)",
    "norm_offset": "normalization offset (BatchNorm/LayerNorm-like bias)",
}


def _build(t: _Trace) -> tuple[BasisPathStructure, list[tuple[str, str]]]:
  # Weight sharing: a kernel or bias used anywhere else.
  shared: dict[Path, str] = {}
  for p, roles in t.roles.items():
    core = [r for r in roles if r[0] in ("kernel", "bias")]
    if core and len(roles) > 1:
      uses = ", ".join(_describe_role(t, r) for r in roles)
      if t.unsupported == "error":
        raise ValueError(
            f"Parameter {path_str(p)!r} is used {len(roles)} times ({uses}): weight sharing. "
            "A G-space layer must own its kernel and bias. Pass unsupported='fallback' to "
            "trace_structure to train the layers that share it outside G-space, or build the "
            "structure by hand with gsgd_jax.chain_structure.")
      shared[p] = f"weight sharing, used {len(roles)} times ({uses})"
      for kind, detail in core:
        t.layers[detail].excluded = "shares its parameters (weight sharing)"

  # Links A -> B: every use of A's output flows into B's input.
  succ: dict[int, int] = {}
  pred: dict[int, int] = {}
  for b, rec in enumerate(t.layers):
    if rec.excluded or rec.lhs.kind != "hom":
      continue
    a = rec.lhs.layer
    if t.layers[a].excluded or (rec.lhs.flat is not None and rec.kind != "dense"):
      continue
    if t.terminals.get(a, []) == [("layer", b)]:
      succ[a], pred[b] = b, a

  chains, singles = [], []
  for b, rec in enumerate(t.layers):
    if rec.excluded or b in pred:
      continue
    run = [b]
    while run[-1] in succ:
      run.append(succ[run[-1]])
    (chains if len(run) > 1 else singles).append(run)

  def make_layer(i: int, first: bool) -> Layer:
    rec = t.layers[i]
    taps: tuple[int, ...] = ()
    if rec.kind == "conv":
      taps = tuple(rec.shape[:-2])
    elif not first and rec.lhs.flat is not None:
      taps = tuple(rec.lhs.flat)
    return Layer(rec.kernel, rec.bias, rec.shape, taps,
                 normalized=t.normalization == "reference" and i in t.normalized)

  built = tuple(Chain(tuple(make_layer(i, k == 0) for k, i in enumerate(run))) for run in chains)
  boundaries = []
  for run in chains:
    names = " -> ".join(t.layers[i].name for i in run)
    boundaries.append(
        (names, f"starts: {_start_reason(t, run[0])}; ends: {_end_reason(t, run[-1])}"))

  notes: dict[Path, list[str]] = {}
  gspace = {p for c in built for l in c.layers for p in (l.kernel, l.bias) if p is not None}
  for run in singles:
    rec = t.layers[run[0]]
    notes.setdefault(rec.kernel, []).append(
        f"single layer: {_start_reason(t, run[0])}; {_end_reason(t, run[0])}")
    if rec.bias is not None:
      notes.setdefault(rec.bias, []).append(
          f"bias of the single layer {rec.name} (see {path_str(rec.kernel)})")
  for p in t.paths:
    if p in gspace:
      continue
    if p in shared:
      notes.setdefault(p, []).append(shared[p])
      continue
    for role in t.roles.get(p, []):
      if role[0] in ("kernel", "bias"):
        continue
      notes.setdefault(p, []).append(_describe_role(t, role))
    if p not in notes:
      notes[p] = ["not used by the traced function"]
  fallback = tuple(p for p in t.paths if p not in gspace)
  note_items = tuple((p, "; ".join(dict.fromkeys(notes[p]))) for p in fallback)
  return BasisPathStructure(built, fallback, note_items), boundaries


def _describe_role(t: _Trace, role) -> str:
  kind, detail = role
  if kind == "kernel":
    return f"kernel of {t.layers[detail].name}"
  if kind == "bias":
    return f"bias of {t.layers[detail].name}"
  if kind == "unsupported":
    return f"kernel of an unsupported layer: {detail}"
  if kind == "unsupported_bias":
    return f"bias of the unsupported layer {detail}"
  if kind in ("norm_scale", "norm_offset"):
    note = _ROLE_NOTE[kind]
    if t.normalization == "reference":
      note += "; normalization='reference' chains run through it"
    return note
  if kind == "scale":
    return _ROLE_NOTE[kind].format(t.layers[detail].name)
  return f"used outside any layer kernel ({detail})"


# ------------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------------

def _trace(apply_fn, params, example_inputs, normalization, unsupported, kwargs):
  if normalization not in ("fallback", "reference"):
    raise ValueError(f"normalization must be 'fallback' or 'reference', got {normalization!r}.")
  if unsupported not in ("error", "fallback"):
    raise ValueError(f"unsupported must be 'error' or 'fallback', got {unsupported!r}.")
  leaves, _ = leaves_with_paths(params)
  paths = [p for p, _ in leaves]
  shapes = {p: tuple(np.shape(x) if not hasattr(x, "shape") else x.shape) for p, x in leaves}

  def fn(p, *xs):
    out = apply_fn(p, *xs, **kwargs)
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], Mapping):
      return out[0]  # linen `apply(..., mutable=[...])`: (y, mutated collections)
    return out

  closed = jax.make_jaxpr(fn)(params, *example_inputs)
  graph = _Graph()
  in_ids = [graph.new(v.aval) for v in closed.jaxpr.invars]
  if len(in_ids) < len(paths):
    raise ValueError("The traced function has fewer inputs than `params` has leaves; pass the "
                     "params pytree as the first argument of apply_fn.")
  outputs = graph.inline(closed.jaxpr, closed.consts, in_ids, ())
  trace = _Trace(paths, shapes, normalization, unsupported)
  _Analysis(graph, trace).run(_live_nodes(graph, outputs), in_ids[:len(paths)], outputs)
  return trace


def trace_structure(apply_fn: Callable[..., Any], params: Any, *example_inputs: Any,
                    normalization: Normalization = "fallback", unsupported: Unsupported = "error",
                    skeleton: str = "aligned", **kwargs: Any) -> BasisPathStructure:
  """Discovers the basis-path structure of a model by tracing ``apply_fn(params, *inputs)``.

  Finds the Dense and Conv layers, follows the data from each layer's output and links two layers
  into one chain when the second one's input is a positively homogeneous, channel-wise function
  of the first one's output (bias add, ReLU, pooling, flatten, ...) that nothing else uses. See the
  module docstring for the rules. Layers left alone (a stem, a projection shortcut, a classifier
  after a residual stream, any layer next to a normalization) and every other parameter go to
  ``structure.fallback``, each with a reason in ``structure.notes``; ``print(structure)`` shows it.

  Args:
    apply_fn: the model as a function of its parameters. linen:
      ``lambda p, x: model.apply({'params': p, **other_collections}, x)``; nnx:
      ``lambda state, x: nnx.merge(graphdef, state, rest)(x)`` (nnx BatchNorm in training mode
      updates ``rest`` in place: pass it as an input, ``lambda p, rest, x: ...``). Everything it
      returns counts as network output, except that a ``(y, mutated_collections)`` pair counts
      as ``y``.
    params: the parameter pytree passed to ``apply_fn`` (linen dict, nnx ``State`` wrapped or not).
      The tracing reads paths and shapes only; the aligned skeleton reads the weights
      (``jax.ShapeDtypeStruct`` leaves work with ``skeleton='modulo'``).
    *example_inputs: example inputs (arrays or ``jax.ShapeDtypeStruct``); only shapes matter.
    normalization: ``'fallback'`` (exact: a normalized layer output ends its chain) or
      ``'reference'`` (the reference code's heuristic: chains run through normalization layers,
      whose parameters go to the fallback; not scale-invariant).
    unsupported: ``'error'`` raises on grouped/depthwise convolutions and shared weights,
      ``'fallback'`` trains those layers outside G-space instead (with a note).
    skeleton: ``'aligned'`` (default: chosen from the weights, :func:`gsgd_jax.align_skeleton`)
      or ``'modulo'`` (the ``j mod h`` convention on unit indices).
    **kwargs: static keyword arguments passed to ``apply_fn`` (e.g. ``train=True``).

  Returns:
    The :class:`BasisPathStructure`: chains of two or more layers in data-flow order; all other
    parameter leaves in ``fallback``, with reasons in ``notes``.

  Raises:
    ValueError: naming the parameter, for a grouped/depthwise convolution or a shared parameter
      (unless ``unsupported='fallback'``) and for an invalid policy.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> class Net(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     x = nn.relu(nn.Conv(4, (3, 3))(x))
    ...     x = nn.relu(nn.Conv(4, (3, 3))(x))
    ...     return nn.Dense(2)(x.reshape((x.shape[0], -1)))
    >>> model, x = Net(), jnp.ones((1, 5, 5, 3))
    >>> params = model.init(jax.random.PRNGKey(0), x)['params']
    >>> s = trace_structure(lambda p, x: model.apply({'params': p}, x), params, x)
    >>> s.chains[0].widths, s.chains[0].layers[-1].taps_shape
    ((3, 4, 4, 2), (5, 5))
  """
  trace = _trace(apply_fn, params, example_inputs, normalization, unsupported, kwargs)
  return with_skeleton(_build(trace)[0], params, skeleton)


def trace_report(apply_fn: Callable[..., Any], params: Any, *example_inputs: Any,
                 normalization: Normalization = "fallback", unsupported: Unsupported = "error",
                 **kwargs: Any) -> str:
  """:func:`trace_structure`'s findings as text: the structure, and why each chain starts and ends.

  Takes the same arguments as :func:`trace_structure`.

  Examples:
    >>> import jax.numpy as jnp
    >>> params = {'a': {'kernel': jnp.ones((3, 4))}, 'b': {'kernel': jnp.ones((4, 2))}}
    >>> f = lambda p, x: jnp.maximum(x @ p['a']['kernel'], 0) @ p['b']['kernel']
    >>> print(trace_report(f, params, jnp.ones((1, 3))).splitlines()[-1])
      chain 0 (a -> b) starts: its input is the network input; ends: its output is a network output
  """
  trace = _trace(apply_fn, params, example_inputs, normalization, unsupported, kwargs)
  structure, boundaries = _build(trace)
  lines = [structure.summary(), f"chain boundaries (normalization={normalization!r}):"]
  for ci, (names, why) in enumerate(boundaries):
    lines.append(f"  chain {ci} ({names}) {why}")
  if not boundaries:
    lines.append("  no chain of two or more layers: G-SGD reduces to the fallback optimizer")
  return "\n".join(lines)


def trace_nnx_structure(model: Any, *example_inputs: Any, wrt: Any = None,
                        normalization: Normalization = "fallback",
                        unsupported: Unsupported = "error", skeleton: str = "aligned",
                        **kwargs: Any) -> BasisPathStructure:
  """:func:`trace_structure` of an ``nnx.Module``, in the layout ``nnx.Optimizer`` uses.

  ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` hands ``tx`` the state ``nnx.state(model,
  nnx.Param)``; this traces ``model(*example_inputs, **kwargs)`` as a function of exactly that
  state (other variables, e.g. BatchNorm statistics, are passed along as inputs), so the returned
  structure plugs into ``gsgd_jax.gsgd(..., structure=...)`` for any nnx model, chain or not.

  Args:
    model: the ``nnx.Module`` (not modified).
    *example_inputs: example inputs of ``model``.
    wrt: the variable filter the optimizer uses (``nnx.Param`` if ``None``).
    normalization, unsupported, skeleton: as in :func:`trace_structure`.
    **kwargs: static keyword arguments of ``model`` (e.g. ``deterministic=True``).

  Returns:
    The :class:`BasisPathStructure`, with paths as in ``nnx.state(model, wrt)``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.relu,
    ...                        nnx.Linear(4, 2, rngs=nnx.Rngs(1)))
    >>> trace_nnx_structure(model, jnp.ones((1, 3))).chains[0].widths
    (3, 4, 2)
  """
  from flax import nnx  # the library itself does not need flax

  wrt = nnx.Param if wrt is None else wrt
  graphdef, params, rest = nnx.split(model, wrt, ...)

  def apply_fn(p, r, *xs):
    return nnx.merge(graphdef, p, r)(*xs, **kwargs)

  return trace_structure(apply_fn, params, rest, *example_inputs, normalization=normalization,
                         unsupported=unsupported, skeleton=skeleton)
