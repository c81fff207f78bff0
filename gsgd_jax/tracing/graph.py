"""The traced function as a flat graph: integer value ids, and nodes with inlined sub-jaxprs.

:meth:`Graph.inline` walks a jaxpr and appends one :class:`Node` per equation. Call-like
higher-order primitives (``jit``/``pjit``, ``closed_call``, ``custom_jvp_call``,
``custom_vjp_call``, ``remat``/``checkpoint``, ...) are inlined: their body's equations join the
graph, wired to the call's inputs and outputs, so layers inside them are found. A ``cond`` is
inlined branch by branch: with a constant index only the selected branch, otherwise every branch,
followed by a ``select_n`` node choosing among the branch results (the index is the predicate).
A ``scan`` that slices parameter leaves (a stack of layers made with ``flax.linen.scan`` or
``nnx.scan``; at most :data:`UNROLL_LIMIT` steps) is unrolled: its body is inlined once per step,
each step reading its slice of every scanned input through a ``scan_slice`` node (a parameter's
slice becomes the parameter ``leaf[i]``) and the per-step outputs stacked by a ``scan_stack``
node. Other loops (``while``, scans over data only) stay single nodes; their rules in
:mod:`gsgd_jax.tracing.rules` explain why.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.extend.core
import numpy as np
from jax.extend import core as jcore

__all__ = ["Node", "Graph", "as_const", "live_nodes", "FOLD_LIMIT", "UNROLL_LIMIT"]

# Higher-order primitives whose sub-jaxpr is inlined (same inputs and outputs as the equation).
# Where a shard_map body starts and ends: the same values, global shapes outside and per-device
# shapes inside (an identity for the tracing rules; see rules' CASTS).
SHARD_BOUNDARY = jax.extend.core.Primitive("shard_map_boundary")

# Unrolled scans: one step's slice of a scanned input (params: {"index": step}), and the per-step
# outputs stacked along a new first axis (see `Graph._scan`).
SCAN_SLICE = jax.extend.core.Primitive("scan_slice")
SCAN_STACK = jax.extend.core.Primitive("scan_stack")
SCAN_SLICE.def_impl(lambda x, *, index: x[index])  # constants fold
SCAN_STACK.def_impl(lambda *xs: jax.numpy.stack(xs))
UNROLL_LIMIT = 512  # longest scan over parameter slices that is unrolled

INLINE = frozenset({
    "pjit", "jit", "closed_call", "core_call", "named_call", "custom_jvp_call", "custom_vjp_call",
    "custom_vjp_call_jaxpr", "remat", "remat2", "checkpoint",
})
SUBJAXPR_KEYS = ("jaxpr", "call_jaxpr", "fun_jaxpr")
FOLD_LIMIT = 1 << 16  # largest constant (elements) folded while tracing


@dataclasses.dataclass
class Node:
  """One primitive application of the flattened jaxpr.

  Attributes:
    prim: the ``jax`` primitive (``node.prim.name`` is the key of the rule table).
    params: the equation's parameters (e.g. ``dimension_numbers``).
    ins: value ids of the operands (see :class:`Graph`).
    outs: value ids of the results.
    scope: names of the enclosing calls, ``/``-joined (e.g. ``"gelu"``), for messages.
  """

  prim: Any
  params: dict
  ins: list[int]
  outs: list[int]
  scope: str

  @property
  def name(self) -> str:
    """The primitive's name."""
    return self.prim.name

  def label(self) -> str:
    """The primitive's name with its scope, for messages: ``"tanh (in gelu)"``."""
    return f"{self.name} (in {self.scope})" if self.scope else self.name


class Graph:
  """All values of a traced function as integer ids, with their shapes, dtypes and constants."""

  def __init__(self):
    self.shapes: list[tuple[int, ...]] = []
    self.dtypes: list[Any] = []
    self.consts: dict[int, np.ndarray] = {}
    self.nodes: list[Node] = []
    self.params: set[int] = set()  # ids of the parameter leaves (scans over them are unrolled)

  def new(self, aval, const=None) -> int:
    """A new value id with ``aval``'s shape and dtype (and a known constant value, if any)."""
    self.shapes.append(tuple(getattr(aval, "shape", ())))
    self.dtypes.append(getattr(aval, "dtype", None))
    i = len(self.shapes) - 1
    if const is not None:
      self.consts[i] = const
    return i

  def inline(self, jaxpr, consts, in_ids: Sequence[int], scope: tuple[str, ...]) -> list[int]:
    """Appends ``jaxpr``'s equations, reading its inputs from ``in_ids``; returns its output ids."""
    env: dict[Any, int] = {}
    for v, c in zip(jaxpr.constvars, consts):
      env[v] = self.new(v.aval, as_const(c))
    for v, i in zip(jaxpr.invars, in_ids):
      env[v] = i

    def read(x):
      if isinstance(x, jcore.Literal):
        return self.new(x.aval, as_const(x.val))
      return env[x]

    for eqn in jaxpr.eqns:
      ins = [read(x) for x in eqn.invars]
      sub = _sub_jaxpr(eqn)
      if sub is not None:
        name = eqn.params.get("name")
        inner = scope + ((str(name),) if name else ())
        outs = self.inline(sub[0], sub[1], ins, inner)
      elif eqn.primitive.name == "cond" and self._cond_ok(eqn):
        outs = self._cond(eqn, ins, scope)
      elif eqn.primitive.name == "shard_map" and isinstance(eqn.params.get("jaxpr"), jcore.Jaxpr):
        outs = self._shard_map(eqn, ins, scope)
      elif eqn.primitive.name == "scan" and self._scan_ok(eqn, ins):
        outs = self._scan(eqn, ins, scope)
      else:
        outs = [self.new(v.aval) for v in eqn.outvars]
        self.nodes.append(Node(eqn.primitive, dict(eqn.params), ins, outs, "/".join(scope)))
      for v, o in zip(eqn.outvars, outs):
        env[v] = o
    return [read(v) for v in jaxpr.outvars]

  def _shard_map(self, eqn, ins: list[int], scope: tuple[str, ...]) -> list[int]:
    """``shard_map``: the per-device body inlined between boundary nodes that change only the
    shapes (global outside, per-device inside; the values are the same arrays)."""
    body = eqn.params["jaxpr"]
    inner = scope + ("shard_map",)
    body_ins = []
    for i, v in zip(ins, body.invars):
      o = self.new(v.aval)
      self.nodes.append(Node(SHARD_BOUNDARY, {}, [i], [o], "/".join(inner)))
      body_ins.append(o)
    body_outs = self.inline(body, (), body_ins, inner)
    outs = []
    for i, v in zip(body_outs, eqn.outvars):
      o = self.new(v.aval)
      self.nodes.append(Node(SHARD_BOUNDARY, {}, [i], [o], "/".join(inner)))
      outs.append(o)
    return outs

  def _scan_ok(self, eqn, ins: list[int]) -> bool:
    """A scan over (slices of) parameter leaves, short enough to unroll."""
    p = eqn.params
    body = p.get("jaxpr")
    first_x = p.get("num_consts", 0) + p.get("num_carry", 0)
    return (isinstance(body, jcore.ClosedJaxpr) and 0 < p.get("length", 0) <= UNROLL_LIMIT
            and len(body.jaxpr.invars) == len(ins)
            and any(i in self.params for i in ins[first_x:]))

  def _scan(self, eqn, ins: list[int], scope: tuple[str, ...]) -> list[int]:
    """``scan`` unrolled: the body once per step, wired carry to carry (see the module doc)."""
    p = eqn.params
    body, n = p["jaxpr"], p["length"]
    nc, nk = p["num_consts"], p["num_carry"]
    consts, carry, xs = ins[:nc], ins[nc:nc + nk], ins[nc + nk:]
    x_vars = body.jaxpr.invars[nc + nk:]
    inner = "/".join(scope + ("scan",))
    per_step = {}
    for i in (reversed(range(n)) if p.get("reverse") else range(n)):
      x_i = []
      for x, v in zip(xs, x_vars):
        o = self.new(v.aval)
        self.nodes.append(Node(SCAN_SLICE, {"index": i}, [x], [o], inner))
        x_i.append(o)
      outs = self.inline(body.jaxpr, body.consts, consts + carry + x_i,
                         scope + (f"scan step {i}",))
      carry, per_step[i] = outs[:nk], outs[nk:]
    ys = []
    for j, v in enumerate(eqn.outvars[nk:]):
      o = self.new(v.aval)
      self.nodes.append(Node(SCAN_STACK, {}, [per_step[i][j] for i in range(n)], [o], inner))
      ys.append(o)
    return list(carry) + ys

  @staticmethod
  def _cond_ok(eqn) -> bool:
    branches = eqn.params.get("branches")
    return bool(branches) and all(
        isinstance(b, jcore.ClosedJaxpr) and len(b.jaxpr.invars) == len(eqn.invars) - 1
        and len(b.jaxpr.outvars) == len(eqn.outvars) for b in branches)

  def _cond(self, eqn, ins: list[int], scope: tuple[str, ...]) -> list[int]:
    """``cond``: the branches inlined, their results merged by ``select_n`` on the index."""
    branches = eqn.params["branches"]
    index, operands = ins[0], ins[1:]
    known = self.consts.get(index)
    if known is not None and known.shape == ():
      k = int(np.clip(int(known), 0, len(branches) - 1))
      b = branches[k]
      return self.inline(b.jaxpr, b.consts, operands, scope + (f"cond branch {k}",))
    results = [self.inline(b.jaxpr, b.consts, operands, scope + (f"cond branch {k}",))
               for k, b in enumerate(branches)]
    outs = []
    for j, v in enumerate(eqn.outvars):
      o = self.new(v.aval)
      self.nodes.append(Node(jax.lax.select_n_p, {}, [index] + [r[j] for r in results], [o],
                             "/".join(scope + ("cond",))))
      outs.append(o)
    return outs


def as_const(x) -> np.ndarray | None:
  """``x`` as a numpy array if it is a small concrete constant, else ``None``.

  Args:
    x: a jaxpr literal or constant.

  Returns:
    The numpy array (at most ``FOLD_LIMIT`` entries), or ``None`` for large or opaque values.
  """
  try:
    a = np.asarray(x)
  except Exception:  # noqa: BLE001 - opaque constants (e.g. PRNG keys) are just unknown values
    return None
  return a if a.dtype != object and a.size <= FOLD_LIMIT else None


def _sub_jaxpr(eqn):
  """``(jaxpr, consts)`` to inline for a call-like higher-order primitive, else ``None``."""
  if eqn.primitive.name not in INLINE:
    return None
  for key in SUBJAXPR_KEYS:
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


def live_nodes(graph: Graph, outputs: Sequence[int]) -> list[Node]:
  """The nodes that contribute to ``outputs``, in order (dead code dropped).

  Args:
    graph: the flat graph of the traced function.
    outputs: value ids of the function's outputs.

  Returns:
    The live nodes, in the graph's (topological) order.
  """
  live = set(outputs)
  keep = []
  for node in reversed(graph.nodes):
    if any(o in live for o in node.outs):
      keep.append(node)
      live.update(node.ins)
  return keep[::-1]
