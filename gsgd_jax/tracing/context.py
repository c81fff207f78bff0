"""The context a tracing rule works with: the values of the traced function and the record of
layers, chains and roles (:class:`Context`), and the primitive families the rules share."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp

from gsgd_jax.tracing.graph import FOLD_LIMIT, Graph, Node, as_const
from gsgd_jax.tracing.values import FREE, End, Kind, Role, TraceRecord, Value, deps

__all__ = ["Rule", "Context"]

Rule = Callable[["Context", Node, list], Optional[Sequence[Value]]]

# Operations that move or copy data without arithmetic (kept by parameter views and layer outputs).
# Annotations of sharded programs: the value is unchanged.
ANNOTATIONS = frozenset({"sharding_constraint", "device_put", "mesh_cast", "reshard", "pvary",
                         "shard_map_boundary"})
CASTS = frozenset({"convert_element_type", "copy", "copy_p", "reduce_precision"}) | ANNOTATIONS
COMPARE = frozenset({"gt", "ge", "lt", "le", "eq", "ne"})
REDUCE = frozenset({"reduce_sum", "reduce_max", "reduce_min"})
POOL = frozenset({"reduce_window_sum", "reduce_window_max", "reduce_window_min"})
CUMULATIVE = frozenset({"cumsum", "cummax", "cummin"})
POWER = frozenset({"integer_pow", "square", "pow"})
NORMALIZERS = frozenset({"rsqrt", "sqrt"})
VIEWS = CASTS | {"reshape", "squeeze", "broadcast_in_dim", "expand_dims", "transpose"}
# Unary operations with a rule for homogeneous operands (see `_hom_unary`).
HOM_UNARY = (CASTS | REDUCE | POOL | CUMULATIVE | {
    "neg", "abs", "reshape", "squeeze", "expand_dims", "broadcast_in_dim", "transpose", "slice",
    "rev", "sign"})
# Primitives after which a non-homogeneous value keeps the description of where it came from.
TRANSPARENT = (CASTS | REDUCE | POOL | CUMULATIVE | {
    "reshape", "squeeze", "expand_dims", "broadcast_in_dim", "transpose", "slice", "pad",
    "concatenate", "rev", "neg", "abs", "max", "min", "select_n", "mul", "div"})
LOOPS = frozenset({"scan", "while"})


# ------------------------------------------------------------------------------------------------
# The context rules work with
# ------------------------------------------------------------------------------------------------

class Context:
  """The state of the dataflow pass, and the helpers rules use.

  Attributes:
    graph: the flattened :class:`~gsgd_jax.tracing.graph.Graph`.
    trace: the :class:`~gsgd_jax.tracing.values.TraceRecord` being filled.
    vals: the :class:`Value` of every value id computed so far.
    reference: ``normalization='reference'`` (chains run through normalization layers).
  """

  def __init__(self, graph: Graph, trace: TraceRecord, rules: Mapping[str, Rule]):
    self.graph = graph
    self.trace = trace
    self.rules = rules
    self.vals: dict[int, Value] = {}
    self.reference = trace.normalization == "reference"

  def val(self, i: int) -> Value:
    """The :class:`Value` of id ``i`` (constants and unknown inputs included)."""
    if i in self.vals:
      return self.vals[i]
    if i in self.graph.consts and self.graph.consts[i] is not None:
      return Value(Kind.CONST, const=self.graph.consts[i])
    return FREE

  def shape(self, i: int) -> tuple[int, ...]:
    """The shape of id ``i``."""
    return self.graph.shapes[i]

  def dtype(self, i: int) -> Any:
    """The dtype of id ``i``."""
    return self.graph.dtypes[i]

  def consume(self, v: Value, kind: End, detail: Any, node: Node | None) -> None:
    """``v`` is used in a way that is not homogeneous for its layer: records the chain end.

    Args:
      v: the operand.
      kind: why the chain ends (:class:`End`).
      detail: what :class:`End` says it needs (usually the operation's label).
      node: the equation (``None`` for a network output).
    """
    if v.kind is Kind.HOM:
      self.trace.end(v.layer, kind, detail)
    elif v.kind is Kind.CENTERED:
      self.trace.end(v.layer, *v.pending)
    elif v.kind is Kind.STAT and self.reference:
      where = node.label() if node is not None else "a network output"
      for a in v.layers:
        self.trace.end(a, End.OP, f"{where} (of its statistics)")

  def generic(self, node: Node, ins: list[Value], kind: End = End.OP, detail: str | None = None,
              why: str | None = None) -> list[Value]:
    """The default rule: every homogeneous operand ends its chain; parameters are used outside.

    Args:
      node: the equation.
      ins: the operands' values.
      kind, detail: the chain end recorded for homogeneous operands (default: ``End.OP`` and
        the operation's label).
      why: what a ``Kind.MIXED`` result is, for messages.

    Returns:
      One value per result: folded constants, or the least specific kind of the operands.
    """
    t = self.trace
    detail = node.label() if detail is None else detail
    kinds = {v.kind for v in ins}
    escapes = bool(kinds & {Kind.HOM, Kind.CENTERED, Kind.MIXED})  # the result is no statistic
    for v in ins:
      if v.kind is not Kind.STAT or escapes:
        self.consume(v, kind, detail, node)
      t.role(v, Role.OTHER, node.label())
    layers = frozenset().union(*[deps(v) for v in ins])
    params = frozenset().union(*[v.params for v in ins])
    # rsqrt is the normalization arithmetic of flax's norm layers (also with running averages);
    # sqrt counts when it is not a plain constant such as jnp.sqrt(2.0).
    norm = (any(v.norm for v in ins) or node.name == "rsqrt"
            or (node.name == "sqrt" and not kinds <= {Kind.CONST}))
    if norm and layers and node.name in NORMALIZERS | {"mul", "div"}:
      t.normalized.update(layers)
    if kinds <= {Kind.CONST}:
      folded = self.fold(node, ins)
      if folded is not None:
        return [dataclasses.replace(f, norm=norm) for f in folded]
      return [Value(Kind.FREE, norm=norm) for _ in node.outs]
    if escapes:
      normalized = any(v.normalized for v in ins) or (norm and bool(layers))
      if why is None and normalized:
        why = "a normalized value (normalization layer)"
      elif why is None:
        mixed = [v.why for v in ins if v.kind is Kind.MIXED and v.why]
        why = mixed[0] if (mixed and node.name in TRANSPARENT) else f"the result of {node.label()}"
      return [Value(Kind.MIXED, params=params, layers=layers, norm=norm, why=why,
                    normalized=normalized) for _ in node.outs]
    for k in (Kind.STAT, Kind.PATTERN):
      if k in kinds:
        return [Value(k, params=params, layers=layers, norm=norm) for _ in node.outs]
    if Kind.PARAM in kinds:
      return [Value(Kind.PARAM, params=params, norm=norm) for _ in node.outs]
    return [Value(Kind.FREE, norm=norm) for _ in node.outs]

  def fold(self, node: Node, ins: list[Value]) -> list[Value] | None:
    """Evaluates an equation of small constants (``None`` if it cannot)."""
    if any(v.const is None for v in ins):
      return None
    if sum(math.prod(self.shape(o)) for o in node.outs) > FOLD_LIMIT:
      return None
    try:
      with jax.ensure_compile_time_eval():
        out = node.prim.bind(*[jnp.asarray(v.const) for v in ins], **node.params)
    except Exception:  # noqa: BLE001 - anything we cannot evaluate is an unknown constant
      return None
    out = out if node.prim.multiple_results else [out]
    res = []
    for o in out:
      c = as_const(o)
      res.append(Value(Kind.CONST, const=c) if c is not None else FREE)
    return res

  def aligned(self, node: Node, v_id: int) -> bool:
    """Elementwise with broadcasting that never spreads one channel over several."""
    s, o = self.shape(v_id), self.shape(node.outs[0])
    return len(s) == len(o) and len(s) >= 1 and s[-1] == o[-1]

  def bias_like(self, node: Node, v: Value, v_id: int, channels: int) -> bool:
    """A per-channel parameter vector broadcast along the channel axis."""
    if v.view is None:
      return False
    p, _, axis = v.view
    if math.prod(self.trace.shapes[p]) != channels:
      return False
    if channels == 1:
      return True
    out_rank, v_rank = len(self.shape(node.outs[0])), len(self.shape(v_id))
    return axis is not None and axis + (out_rank - v_rank) == out_rank - 1

  def relabel(self, ins: list[Value], kind: Role, detail: Any = None) -> None:
    """Turns the role just given to parameter views in ``ins`` into ``kind``."""
    for v in ins:
      if v.view is not None and self.trace.roles.get(v.view[0]):
        self.trace.roles[v.view[0]][-1] = (kind, detail)

  def mixes_channels(self, node: Node, v: Value) -> Value:
    """``node`` mixes the channels of ``v``: its chain ends."""
    self.consume(v, End.MIX, node.label(), node)
    return Value(Kind.MIXED, layers=deps(v), why=f"the result of {node.label()} across channels")

  def step(self, node: Node, ins: list[Value]) -> list[Value]:
    """The results of one equation: constants folded, else its rule, else :meth:`generic`."""
    if (node.name == "shard_map_boundary" and ins[0].view is not None
        and self.shape(node.ins[0]) != self.shape(node.outs[0])):
      # a parameter split across devices (jax.pmap over replicated params): its per-device
      # slice is not the leaf the structure would address; it stays outside G-space
      self.trace.role(ins[0], Role.OTHER, "split across devices by shard_map/pmap (trace the "
                      "per-device function with unreplicated params)")
      return [Value(Kind.PARAM, params=ins[0].params)]
    if all(v.kind is Kind.CONST for v in ins):
      if node.name in ANNOTATIONS and len(ins) == len(node.outs) == 1:
        return list(ins)  # the same constant (pvary of a literal inside shard_map)
      return self.generic(node, ins)
    rule = self.rules.get(node.name)
    if rule is not None:
      out = rule(self, node, ins)
      if out is not None:
        out = list(out)
        if len(out) != len(node.outs) or not all(isinstance(v, Value) for v in out):
          raise TypeError(f"The tracing rule {rule!r} for {node.name!r} returned {out!r}; a rule "
                          f"returns one Value per result ({len(node.outs)}) or None.")
        return out
    return self.generic(node, ins)

  def run(self, nodes: list[Node], param_ids: list[int], outputs: list[int]) -> None:
    """The pass: parameters get views, every node its rule, outputs end their chains."""
    t = self.trace
    for p, i in zip(t.paths, param_ids):
      shape = t.shapes[p]
      nonunit = [a for a, n in enumerate(shape) if n != 1]
      axis = nonunit[0] if len(nonunit) == 1 else None
      self.vals[i] = Value(Kind.PARAM, view=(p, True, axis), params=frozenset([p]))
    for node in nodes:
      outs = self.step(node, [self.val(i) for i in node.ins])
      for o, v in zip(node.outs, outs):
        self.vals[o] = v
    for i in outputs:
      v = self.val(i)
      self.consume(v, End.OUTPUT, "", None)
      t.role(v, Role.OTHER, "returned as an output")
