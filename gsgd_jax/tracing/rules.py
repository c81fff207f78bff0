"""The dataflow pass: one rule per primitive, in a table users can extend.

:data:`DEFAULT_RULES` (read-only) maps a primitive name to a *rule*, a function

.. code-block:: python

   rule(ctx: Context, node: Node, ins: list[Value]) -> Sequence[Value] | None

called for every live equation of the traced function, in order. ``node`` is the equation
(``node.name``, ``node.params``, operand ids ``node.ins``, result ids ``node.outs``;
``ctx.shape(i)`` and ``ctx.dtype(i)`` give an id's shape and dtype), ``ins`` the :class:`Value`
of each operand. The rule returns one :class:`Value` per result, or ``None`` to let
:meth:`Context.generic` handle the equation: the default for every primitive without a rule,
which treats the operation as *not* positively homogeneous (each layer output among the operands
ends its chain there, and each parameter leaf among them is recorded as used outside a layer). A
rule that keeps a chain going returns the operand's value (``Kind.HOM`` with the same ``layer``);
one that ends it calls ``ctx.consume(value, End.OP, detail, node)`` or simply returns ``None``.
Equations whose operands are all constants are folded before any rule is looked up. A rule that
raises stops the trace. The table is an argument, as kfac-jax passes its graph patterns: extend it
per call, ``trace_structure(..., rules={**DEFAULT_RULES, "my_prim": my_rule})``; nothing global
changes.

:func:`homogeneous_elementwise` is a ready-made rule for elementwise positively homogeneous,
channel-wise operations (a custom ReLU-like primitive).

Examples:
  A custom ReLU primitive ends the chain until a rule for it is passed:

  >>> import jax, jax.numpy as jnp
  >>> from jax.extend.core import Primitive
  >>> from gsgd_jax.tracing import DEFAULT_RULES, homogeneous_elementwise, trace_structure
  >>> my_relu_p = Primitive('my_relu')
  >>> _ = my_relu_p.def_impl(lambda x: jnp.maximum(x, 0))
  >>> _ = my_relu_p.def_abstract_eval(lambda x: jax.core.ShapedArray(x.shape, x.dtype))
  >>> params = {'a': {'kernel': jnp.ones((3, 4))}, 'b': {'kernel': jnp.ones((4, 2))}}
  >>> f = lambda p, x: my_relu_p.bind(x @ p['a']['kernel']) @ p['b']['kernel']
  >>> len(trace_structure(f, params, jnp.ones((1, 3)), skeleton='modulo').chains)
  0
  >>> rules = {**DEFAULT_RULES, 'my_relu': homogeneous_elementwise}
  >>> trace_structure(f, params, jnp.ones((1, 3)), skeleton='modulo', rules=rules).chains[0].widths
  (3, 4, 2)
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
from typing import Any

from gsgd_jax._tree import StackIndex, is_slice, path_str
from gsgd_jax.tracing.context import (CASTS, COMPARE, CUMULATIVE, HOM_UNARY, LOOPS, POOL, POWER,
                                      REDUCE, VIEWS, Context, Rule)
from gsgd_jax.tracing.graph import UNROLL_LIMIT, Node
from gsgd_jax.tracing.values import (FREE, End, Kind, LayerRecord, Role, Value, deps, is_float,
                                     is_zero, layer_name)

__all__ = ["DEFAULT_RULES", "homogeneous_elementwise", "register_rule"]

# ------------------------------------------------------------------------------------------------
# The table
# ------------------------------------------------------------------------------------------------

_TABLE: dict[str, Rule] = {}

# Parameter names of attention projections (flax MultiHeadDotProductAttention and the like).
_ATTENTION = re.compile(r"(?i)(attention|attn|(^|/)(query|key|value|qkv|q|k|v)(/|$))")


def register_rule(primitive: Any, rule: Any) -> None:
  """Removed in gsgd_jax 0.2 (it changed a process-global table): raises a ``TypeError`` naming
  the replacement, ``trace_structure(..., rules={**DEFAULT_RULES, name: rule})``."""
  name = primitive if isinstance(primitive, str) else getattr(primitive, "name", primitive)
  raise TypeError(
      "gsgd_jax.tracing.register_rule was removed in gsgd_jax 0.2: the rule table is an argument "
      f"now. Pass rules={{**gsgd_jax.tracing.DEFAULT_RULES, {name!r}: rule}} to trace_structure "
      "(or trace_report, trace_nnx_structure). See CHANGELOG.md.")


def _rule(*names):
  def deco(fn):
    for n in names:
      _TABLE[n] = fn
    return fn
  return deco


def homogeneous_elementwise(ctx: Context, node: Node, ins: list[Value]) -> list[Value] | None:
  """A rule for elementwise, positively homogeneous unary operations (ReLU-like primitives).

  Args:
    ctx: the pass's :class:`Context`.
    node: the equation (one operand, one result of the same shape).
    ins: the operand's value.

  Returns:
    The operand's value when it is a homogeneous function of a layer (the chain continues),
    else ``None`` (the generic rule).
  """
  if (len(ins) == 1 and len(node.outs) == 1 and ins[0].kind is Kind.HOM
      and ctx.shape(node.ins[0]) == ctx.shape(node.outs[0])):
    return [ins[0]]
  return None


# -- layers ---------------------------------------------------------------------------------------

@_rule("dot_general", "conv_general_dilated")
def _kernel_op(ctx: Context, node: Node, ins: list[Value]) -> list[Value]:
  """A Dense layer (``dot_general``) or a convolution whose kernel is a whole parameter leaf."""
  t = ctx.trace
  lhs, rhs = ins
  name = node.name
  kernel = rhs.view[0] if rhs.view is not None else None
  identity = rhs.view is not None and rhs.view[1] and ctx.shape(node.ins[1]) == t.shapes.get(kernel)
  if not identity:
    return ctx.generic(node, ins, End.OP, node.label())
  shape = t.shapes[kernel]
  problem = None
  if name == "dot_general":
    (lc, rc), (lb, rb) = node.params["dimension_numbers"]
    lhs_rank = len(ctx.shape(node.ins[0]))
    if len(shape) != 2 or tuple(rc) != (0,) or tuple(lc) != (lhs_rank - 1,) or lb or rb:
      problem = (f"dot_general with kernel {shape} is not a Dense (in, out) layer "
                 f"(contracting {tuple(lc)} x {tuple(rc)}, batch {tuple(lb)} x {tuple(rb)})")
      if _ATTENTION.search(path_str(kernel)):
        problem = ("an attention projection: attention is not positively homogeneous (a "
                   "softmax of query-key products), so it stays outside G-space; " + problem)
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
      if t.unsupported == "error":
        raise ValueError(
            f"Parameter {path_str(kernel)!r} is the kernel of a {problem}. G-space does not "
            "cover it. Pass unsupported='exclude' to trace_structure to train it outside "
            "G-space (with the fallback optimizer), or build the structure by hand with "
            "gsgd_jax.chain_structure.")
    elif (rhs_spec != (nd - 1, nd - 2) + tuple(range(nd - 2)) or lhs_spec[1] != nd - 1
          or out_spec[1] != nd - 1):
      problem = (f"convolution layout is not channels-last with a (*taps, in, out) kernel "
                 f"(lhs_spec={lhs_spec}, rhs_spec={rhs_spec}, out_spec={out_spec})")
    kind = "conv"
  if problem is not None:
    t.role(rhs, Role.UNSUPPORTED, problem)
    t.role(lhs, Role.OTHER, node.label())
    lname = layer_name(kernel)
    ctx.consume(lhs, End.UNSUPPORTED, lname, node)
    layers = deps(lhs)
    if layers:
      return [Value(Kind.MIXED, layers=layers, unsupported=lname,
                    why=f"the output of an unsupported layer ({lname})")]
    return [Value(Kind.PARAM, params=lhs.params | {kernel}, unsupported=lname)]
  idx = len(t.layers)
  t.layers.append(LayerRecord(kernel, shape, kind, lhs, scope=node.scope))
  t.role(rhs, Role.KERNEL, idx)
  if lhs.kind is Kind.HOM and (kind == "dense" or lhs.flat is None):
    t.end(lhs.layer, End.LAYER, idx)
  else:
    ctx.consume(lhs, End.LAYER, idx, node)
    t.role(lhs, Role.OTHER, f"input of layer {path_str(kernel)}")
  return [Value(Kind.HOM, layer=idx)]


# -- unary operations: parameter views, and data movement of homogeneous values -----------------

@_rule(*(VIEWS | HOM_UNARY))
def _unary(ctx: Context, node: Node, ins: list[Value]) -> list[Value] | None:
  """Casts, reshapes, transposes, slices, reductions, pooling, ... of one operand."""
  if len(ins) != 1 or len(node.outs) != 1:
    return None
  v = ins[0]
  if v.view is not None and node.name in VIEWS:
    return [_view_op(ctx, node, v)]
  if v.kind.homogeneous and is_float(ctx.dtype(node.outs[0])):
    out = _hom_unary(ctx, node, v)
    if out is not None:
      return [out]
  return None


def _view_op(ctx: Context, node: Node, v: Value) -> Value:
  """A reshape, cast, broadcast or transpose of a parameter leaf: still a view of it."""
  p, identity, axis = v.view
  in_shape, out_shape = ctx.shape(node.ins[0]), ctx.shape(node.outs[0])
  name = node.name
  n = math.prod(ctx.trace.shapes[p])
  if name in CASTS:
    return v
  if name in ("reshape", "squeeze", "expand_dims"):
    nonunit = [a for a, k in enumerate(out_shape) if k != 1]
    axis = nonunit[0] if (len(nonunit) == 1 and out_shape[nonunit[0]] == n) else None
    return dataclasses.replace(v, view=(p, identity, axis))
  if name == "broadcast_in_dim":
    dims = tuple(node.params["broadcast_dimensions"])
    new_axis = dims[axis] if axis is not None else None
    return dataclasses.replace(v, view=(p, identity and out_shape == in_shape, new_axis))
  # transpose
  perm = tuple(node.params["permutation"])
  new_axis = perm.index(axis) if axis is not None else None
  return dataclasses.replace(v, view=(p, identity and perm == tuple(range(len(perm))), new_axis))


def _hom_unary(ctx: Context, node: Node, v: Value) -> Value | None:
  """A unary operation on a homogeneous value, or ``None`` if it ends the chain."""
  name = node.name
  params = node.params
  in_shape, out_shape = ctx.shape(node.ins[0]), ctx.shape(node.outs[0])
  last = len(in_shape) - 1
  if name in CASTS or name in ("neg", "abs"):
    return v
  if v.kind is Kind.CENTERED and name not in ("reshape", "squeeze", "expand_dims",
                                              "broadcast_in_dim"):
    return None
  if name in ("reshape", "squeeze", "expand_dims"):
    if params.get("dimensions") is not None:  # a transposing reshape
      return None
    flat = _reshape_channels(in_shape, out_shape, v.flat)
    if flat is False:
      return ctx.mixes_channels(node, v)
    return dataclasses.replace(v, flat=flat)
  if name == "broadcast_in_dim":
    dims = tuple(params["broadcast_dimensions"])
    if dims and dims[-1] == len(out_shape) - 1 and out_shape[-1] == in_shape[-1]:
      return v
    return None
  if name == "transpose":
    return v if tuple(params["permutation"])[-1] == last else None
  if name in REDUCE:
    axes = tuple(params["axes"])
    if last not in axes and len(out_shape) >= 1:
      return v
    if ctx.reference and v.kind is Kind.HOM and name == "reduce_sum":  # LayerNorm-type mean
      return Value(Kind.STAT, layers=frozenset([v.layer]))
    return ctx.mixes_channels(node, v)
  if name in CUMULATIVE:
    return v if params.get("axis") != last else None
  if name in POOL:
    ok = (params["window_dimensions"][-1] == 1 and params["window_strides"][-1] == 1
          and tuple(params["padding"][-1]) == (0, 0)
          and params.get("base_dilation", (1,) * (last + 1))[-1] == 1)
    return v if ok else ctx.mixes_channels(node, v)
  if name == "slice":
    start, limit = params["start_indices"], params["limit_indices"]
    strides = params.get("strides") or (1,) * len(start)
    ok = start[-1] == 0 and limit[-1] == in_shape[-1] and strides[-1] == 1
    return v if ok else None
  if name == "rev":
    return v if last not in tuple(params["dimensions"]) else None
  if name == "sign":
    return Value(Kind.PATTERN, layers=frozenset([v.layer]))
  return None


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


# -- binary operations ----------------------------------------------------------------------------

@_rule("add", "sub", "add_any")
def _add(ctx: Context, node: Node, ins: list[Value]) -> list[Value]:
  """Bias adds, sums of branches, offsets (``x - mean`` under ``normalization='reference'``)."""
  t = ctx.trace
  homs = [k for k, v in enumerate(ins) if v.kind.homogeneous]
  if not homs:
    branches = [v for v in ins if v.kind is Kind.MIXED]
    why = None
    if len(branches) == 2:
      why = "a sum of several branches (a residual stream)"
    elif branches:
      why = branches[0].why
    out = ctx.generic(node, ins, why=why)[0]
    if any(v.normalized for v in ins):  # e.g. normalized * scale + offset
      ctx.relabel(ins, Role.NORM_OFFSET)
    unsupported = [v.unsupported for v in ins if v.unsupported]
    if unsupported and any(v.view is not None for v in ins):
      ctx.relabel(ins, Role.UNSUPPORTED_BIAS, unsupported[0])
      return [dataclasses.replace(out, unsupported=None)]
    return [out]
  if len(homs) == 2:
    (ia, ib), (va, vb) = node.ins, ins
    if (va.kind is vb.kind is Kind.HOM and va.layer == vb.layer and va.flat == vb.flat
        and ctx.aligned(node, ia) and ctx.aligned(node, ib)):
      return [dataclasses.replace(va, normalized=va.normalized and vb.normalized)]
    for v in (va, vb):
      ctx.consume(v, End.SUM, "", node)
    return [Value(Kind.MIXED, layers=deps(va) | deps(vb),
                  why="a sum of several branches (a residual stream)")]
  k = homs[0]
  h, ih = ins[k], node.ins[k]
  other, io = ins[1 - k], node.ins[1 - k]
  if not ctx.aligned(node, ih):
    return ctx.generic(node, ins, End.MIX)
  if is_zero(other):
    return [h]
  channels = ctx.shape(ih)[-1]
  if h.kind is Kind.HOM and h.flat is None and ctx.bias_like(node, other, io, channels):
    rec = t.layers[h.layer]
    if h.normalized:
      t.role(other, Role.NORM_OFFSET, h.layer)
      return [h]
    if rec.bias is None:
      rec.bias = other.view[0]
      t.role(other, Role.BIAS, h.layer)
      return [h]
  t.role(other, Role.OTHER, node.label())
  if h.kind is Kind.HOM and ctx.reference and (
      other.kind in (Kind.CONST, Kind.FREE, Kind.PARAM)
      or (other.kind is Kind.STAT and other.layers <= {h.layer})):
    # x - mean with a mean that is not a function of x (running average, LayerNorm mean):
    # wait for the normalization that should follow.
    pending = (End.SUM, "") if other.kind is Kind.FREE else (End.OFFSET, node.label())
    return [dataclasses.replace(h, kind=Kind.CENTERED, pending=pending)]
  if other.kind in (Kind.CONST, Kind.PARAM, Kind.STAT) or deps(other) <= {h.layer}:
    ctx.consume(h, End.OFFSET, node.label(), node)
    ctx.consume(other, End.OFFSET, node.label(), node)
    return [Value(Kind.MIXED, layers=frozenset([h.layer]) | other.layers, params=other.params,
                  why=f"the result of {node.label()}", normalized=h.normalized)]
  ctx.consume(h, End.SUM, "", node)
  ctx.consume(other, End.SUM, "", node)
  return [Value(Kind.MIXED, layers=frozenset([h.layer]) | other.layers, params=other.params,
                why="a sum of several branches (a residual stream)")]


@_rule("mul", "div")
def _mul(ctx: Context, node: Node, ins: list[Value]) -> list[Value]:
  """Scales by invariant factors (dropout masks, constants), normalizations, products."""
  t = ctx.trace
  div = node.name == "div"
  homs = [(i, v) for i, v in zip(node.ins, ins) if v.kind.homogeneous]
  if not homs:
    out = ctx.generic(node, ins)
    if any(v.norm or v.normalized for v in ins):  # rsqrt(var + eps) * scale
      ctx.relabel(ins, Role.NORM_SCALE)
    return out
  if len(homs) == 2 or (div and ins[1].kind.homogeneous):
    if not div and len(homs) == 2 and homs[0][1].layer == homs[1][1].layer:
      return _power(ctx, node, ins)
    for _, v in homs:
      ctx.consume(v, End.MUL, "", node)
    return [Value(Kind.MIXED, layers=frozenset().union(*[deps(v) for _, v in homs]),
                  why=f"a product of activations ({node.label()})")]
  (ih, h), = homs
  other = ins[1] if node.ins[0] == ih else ins[0]
  if not ctx.aligned(node, ih):
    return ctx.generic(node, ins, End.MIX)
  if other.norm and (other.invariant or (other.kind is Kind.STAT and other.layers <= {h.layer})):
    # A normalization: the layer output divided by its own scale.
    t.normalized.add(h.layer)
    t.role(other, Role.NORM_SCALE, h.layer)
    if ctx.reference:
      return [dataclasses.replace(h, kind=Kind.HOM, normalized=True, pending=None)]
    ctx.consume(h, End.NORM, "", node)
    return [Value(Kind.MIXED, layers=frozenset([h.layer]) | other.layers, params=other.params,
                  why="a normalized value (normalization layer)", normalized=True)]
  if other.invariant:
    t.role(other, Role.NORM_SCALE if h.normalized else Role.SCALE, h.layer)
    return [h]
  if other.kind is Kind.MIXED and deps(other) - {h.layer}:
    ctx.consume(h, End.MUL, "", node)
    ctx.consume(other, End.MUL, "", node)
    return [Value(Kind.MIXED, layers=deps(other) | {h.layer}, params=other.params,
                  why=f"a product of activations ({node.label()})")]
  return ctx.generic(node, ins)


@_rule(*POWER)
def _power(ctx: Context, node: Node, ins: list[Value]) -> list[Value]:
  """Squares of a layer output: statistics (variance) of that layer."""
  homs = [v for v in ins if v.kind.homogeneous]
  if not homs or any(v.kind not in (Kind.HOM, Kind.CENTERED, Kind.CONST) for v in ins):
    return ctx.generic(node, ins)
  if not ctx.reference:
    for v in homs:
      ctx.consume(v, End.OP, node.label(), node)
  return [Value(Kind.STAT, layers=frozenset(v.layer for v in homs))]


@_rule("max", "min")
def _maxmin(ctx: Context, node: Node, ins: list[Value]) -> list[Value]:
  """ReLU (``max`` with 0) and ``max(x, a x)``; maxima with anything else end the chain."""
  homs = [(i, v) for i, v in zip(node.ins, ins) if v.kind is Kind.HOM]
  if len(homs) == 1:
    (ih, h), = homs
    other = ins[1] if ins[0] is h else ins[0]
    if is_zero(other) and ctx.aligned(node, ih):
      return [h]  # ReLU
  if (len(homs) == 2 and homs[0][1].layer == homs[1][1].layer
      and homs[0][1].flat == homs[1][1].flat and all(ctx.aligned(node, i) for i, _ in homs)):
    return [homs[0][1]]  # e.g. max(x, 0.1 x)
  detail = f"{node.name} with a non-zero value" if len(homs) == 1 else node.label()
  return ctx.generic(node, ins, End.OP, detail)


@_rule(*COMPARE)
def _compare(ctx: Context, node: Node, ins: list[Value]) -> list[Value]:
  """``x > 0``: a sign pattern, invariant under scaling."""
  homs = [v for v in ins if v.kind is Kind.HOM]
  others = [v for v in ins if v.kind is not Kind.HOM]
  if homs and all(is_zero(v) for v in others) and len({v.layer for v in homs}) == 1:
    return [Value(Kind.PATTERN, layers=frozenset([homs[0].layer]))]
  return ctx.generic(node, ins)


@_rule("select_n")
def _select(ctx: Context, node: Node, ins: list[Value]) -> list[Value]:
  """``where(pattern, x, 0)``, leaky ReLU, and the merge of ``cond`` branches."""
  pred, cases = ins[0], ins[1:]
  homs = [v for v in cases if v.kind is Kind.HOM]
  if (pred.invariant and homs and len({(v.layer, v.flat) for v in homs}) == 1
      and all(v.kind is Kind.HOM or is_zero(v) for v in cases)
      and all(ctx.aligned(node, i) for i, v in zip(node.ins[1:], cases) if v.kind is Kind.HOM)):
    return [dataclasses.replace(homs[0], normalized=all(v.normalized for v in homs))]
  return ctx.generic(node, ins)


@_rule("pad")
def _pad(ctx: Context, node: Node, ins: list[Value]) -> list[Value]:
  """Zero padding of positions."""
  x, value = ins
  channel_padding = tuple(node.params["padding_config"][-1])
  if x.kind is Kind.HOM and is_zero(value) and channel_padding == (0, 0, 0):
    return [x]
  return ctx.generic(node, ins)


@_rule("concatenate")
def _concatenate(ctx: Context, node: Node, ins: list[Value]) -> list[Value]:
  """Concatenation of pieces of one layer output (or zeros) along a position axis."""
  homs = [v for v in ins if v.kind is Kind.HOM]
  last = len(ctx.shape(node.outs[0])) - 1
  if (homs and node.params["dimension"] != last and len({(v.layer, v.flat) for v in homs}) == 1
      and all(v.kind is Kind.HOM or is_zero(v) for v in ins)):
    return [homs[0]]
  return ctx.generic(node, ins)


@_rule("stack")
def _stack(ctx: Context, node: Node, ins: list[Value]) -> list[Value]:
  """Per-channel statistics of one layer stacked for one collective (flax's data-parallel
  BatchNorm stacks mean and mean of squares before ``pmean``): with ``normalization='reference'``
  the stack is a statistic of that layer; the collective, the slices and the arithmetic after it
  keep it one (:meth:`Context.generic`), so the normalization is recognized as without an axis
  name."""
  stats = [v for v in ins if v.kind in (Kind.HOM, Kind.STAT)]
  last = len(ctx.shape(node.outs[0])) - 1
  layers = frozenset().union(*[deps(v) for v in stats]) if stats else frozenset()
  if (ctx.reference and stats and len(layers) == 1 and node.params.get("axis") != last
      and all(v.kind in (Kind.HOM, Kind.STAT, Kind.CONST) for v in ins)
      and all(v.kind is not Kind.HOM or v.flat is None for v in stats)):
    return [Value(Kind.STAT, layers=layers)]
  return ctx.generic(node, ins)


# -- unrolled scans -------------------------------------------------------------------------------

@_rule("scan_slice")
def _scan_slice(ctx: Context, node: Node, ins: list[Value]) -> list[Value] | None:
  """One step's slice of a scanned input. A whole parameter leaf gives the parameter ``leaf[i]``
  (a layer of a stack made with ``nn.scan``/``nnx.scan``); data and parameter-only values keep
  their kind; a layer output sliced by a scan ends its chain."""
  v, i = ins[0], node.params["index"]
  t = ctx.trace
  if (v.view is not None and v.view[1] and not is_slice(v.view[0])
      and ctx.shape(node.ins[0]) == t.shapes[v.view[0]]):
    path = v.view[0] + (StackIndex(i),)
    shape = ctx.shape(node.outs[0])
    t.add_slice(v.view[0], path, shape)
    nonunit = [a for a, n in enumerate(shape) if n != 1]
    return [Value(Kind.PARAM, view=(path, True, nonunit[0] if len(nonunit) == 1 else None),
                  params=frozenset([path]))]
  if v.kind in (Kind.FREE, Kind.PARAM) and v.view is None:
    return [v]
  return None


@_rule("scan_stack")
def _scan_stack(ctx: Context, node: Node, ins: list[Value]) -> list[Value] | None:
  """The per-step outputs of an unrolled scan, stacked: data stays data, parameter-only values
  stay parameter-only; a layer output among them ends its chain (the default rule)."""
  if all(v.kind is Kind.FREE for v in ins):
    return [FREE]
  if all(v.kind in (Kind.FREE, Kind.PARAM) and v.view is None for v in ins):
    return [Value(Kind.PARAM, params=frozenset().union(*[v.params for v in ins]))]
  return None


# -- loops ----------------------------------------------------------------------------------------

LOOP_NOTE = ("layers inside a loop body are not traced into (only a scan over parameter "
             f"slices of at most {UNROLL_LIMIT} steps, a stack of layers made with nn.scan or "
             "nnx.scan, is unrolled; a while loop or a scan whose weights are shared by every "
             "step is not), so such layers are trained by the fallback")


@_rule(*LOOPS)
def _loop(ctx: Context, node: Node, ins: list[Value]) -> list[Value]:
  """``scan``/``while``: opaque. Values through them end their chains; parameters go to fallback.

  A parameter read by the loop body is recorded with ``Role.LOOP`` (a note saying why), and the
  loop is listed in ``TraceRecord.loops`` for :func:`gsgd_jax.tracing.trace_report`.
  """
  label = node.label()
  out = ctx.generic(node, ins, End.OP, f"{label} (a loop: its body is not traced into)")
  first_x = (node.params.get("num_consts", 0) + node.params.get("num_carry", 0)
             if node.name == "scan" else len(ins))
  scanned = {v.view[0] for v in ins[first_x:] if v.view is not None}
  stacked = []
  for p in dict.fromkeys(v.view[0] for v in ins if v.view is not None):
    shape = ctx.trace.shapes[p]
    what = (f"scanned over its first axis, shape {shape}" if p in scanned
            else f"shape {shape}")
    ctx.trace.roles[p] = [(Role.LOOP, f"read inside {label} ({what}): {LOOP_NOTE}")
                          if r == (Role.OTHER, label) else r for r in ctx.trace.roles[p]]
    stacked.append(path_str(p))
  if stacked or any(deps(v) for v in ins):
    reads = f"reads {', '.join(stacked)}; " if stacked else ""
    ctx.trace.loops.append((label, reads + LOOP_NOTE))
  return out


DEFAULT_RULES: types.MappingProxyType = types.MappingProxyType(dict(_TABLE))
"""The built-in rules, read-only: ``trace_structure``'s default ``rules``. Extend a copy per call:
``rules={**DEFAULT_RULES, "my_prim": my_rule}``."""
