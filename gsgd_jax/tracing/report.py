"""From the dataflow facts to a structure, and why each chain starts and ends.

:func:`build` turns a :class:`~gsgd_jax.tracing.values.TraceRecord` into a
:class:`~gsgd_jax.structure.BasisPathStructure` (chains, fallback, notes) and the chain-boundary
explanations; :func:`format_report` is the text of :func:`gsgd_jax.tracing.trace_report`.
"""

from __future__ import annotations

from typing import Any

from gsgd_jax._tree import Path, StackIndex, is_slice, path_str
from gsgd_jax.structure import BasisPathStructure, Chain, Layer
from gsgd_jax.tracing.values import End, Kind, Role, TraceRecord

__all__ = ["build", "format_report", "end_reason", "start_reason", "describe_role"]

_NOUN = {
    End.OUTPUT: "a network output",
    End.SUM: "a residual sum",
    End.MUL: "a product with another activation",
    End.NORM: "a normalization",
}
_KEPT_BY_NORM = (End.LAYER, End.OUTPUT, End.SUM, End.MUL, End.UNSUPPORTED)


def end_reason(t: TraceRecord, a: int) -> str:
  """Why the chain of layer ``a`` ends after it.

  Args:
    t: the trace.
    a: the layer's index.

  Returns:
    A sentence fragment, e.g. ``"its output is a network output"``.
  """
  terms = list(dict.fromkeys(t.terminals.get(a, [])))
  if a in t.normalized and t.normalization == "exact":
    kept = [x for x in terms if x[0] in _KEPT_BY_NORM]
    terms = kept + [(End.NORM, "")]
  if not terms:
    return "its output is not used"

  def noun(kind, detail):
    if kind is End.LAYER:
      return t.layers[detail].name
    if kind in (End.OP, End.OFFSET):
      return str(detail)
    if kind is End.MIX:
      return f"{detail} (mixes channels)"
    if kind is End.UNSUPPORTED:
      return f"the unsupported layer {detail}"
    return _NOUN[kind]

  ops = {str(d).split(" ")[0] for k, d in terms if k in (End.OP, End.OFFSET)}
  act = activation_name(ops)
  if act is not None and all(k in (End.OP, End.OFFSET, End.MUL, End.SUM) for k, _ in terms):
    details = ", ".join(str(d) for k, d in terms if k in (End.OP, End.OFFSET))
    return f"not positively homogeneous after it: {details} ({act})"
  if len(terms) > 1:
    return f"its output feeds {len(terms)} consumers: " + ", ".join(noun(*x) for x in terms)
  kind, detail = terms[0]
  if kind is End.LAYER:
    return f"its output feeds {t.layers[detail].name}, which is outside G-space"
  if kind is End.OUTPUT:
    return "its output is a network output"
  if kind is End.SUM:
    return "its output is summed with another branch (residual add)"
  if kind is End.MUL:
    return "its output is multiplied by another activation"
  if kind is End.NORM:
    return ("its output is normalized (BatchNorm/LayerNorm/GroupNorm-like), which makes the "
            "incoming weights of each channel scale-invariant on their own")
  if kind is End.MIX:
    return f"{detail} mixes its output channels"
  if kind is End.OFFSET:
    return (f"its output gets an offset that is not a G-space layer's output ({detail}: a "
            "bias-like parameter, or a residual stream from outside G-space)")
  if kind is End.UNSUPPORTED:
    return f"its output feeds the unsupported layer {detail}"
  return f"not positively homogeneous after it: {detail}"


# Primitives by which common activations show in a jaxpr (after jax.nn's custom_jvp is inlined).
_ACTIVATIONS = (
    (frozenset({"erf"}), "a GELU (exact, erf)"),
    (frozenset({"erfc"}), "a GELU (exact, erfc)"),
    (frozenset({"integer_pow", "tanh"}), "a GELU (tanh approximation)"),
    (frozenset({"integer_pow"}), "a GELU (tanh approximation, or another polynomial activation)"),
    (frozenset({"logistic"}), "a sigmoid/SiLU/swish (logistic)"),
    (frozenset({"tanh"}), "a tanh"),
    (frozenset({"exp"}), "an ELU/softplus-like exponential"),
    (frozenset({"log1p"}), "a softplus-like log"),
    (frozenset({"sign"}), "a sign function"),
)


def activation_name(ops: set) -> str | None:
  """A reader's name for the activation whose primitives are ``ops``, or ``None``."""
  for needed, name in _ACTIVATIONS:
    if needed <= set(ops):
      return name
  return None


def start_reason(t: TraceRecord, b: int) -> str:
  """Why a chain starts at layer ``b``.

  Args:
    t: the trace.
    b: the layer's index.

  Returns:
    A sentence fragment, e.g. ``"its input is the network input"``.
  """
  lhs = t.layers[b].lhs
  if lhs.kind is Kind.HOM:
    a = t.layers[lhs.layer]
    if a.excluded:
      return f"its input comes from {a.name}, which is outside G-space"
    if lhs.flat is not None and t.layers[b].kind != "dense":
      return "its input is a flattened feature map"
    return f"its input is also used elsewhere ({a.name} output feeds several consumers)"
  if lhs.kind is Kind.CENTERED:
    return ("its input is a layer output plus an offset" if lhs.pending[0] is End.OFFSET
            else "its input is a sum of several branches (a residual stream)")
  if lhs.kind in (Kind.FREE, Kind.CONST):
    return "its input is the network input"
  if lhs.kind is Kind.PARAM:
    return ("its input is not the output of a G-space layer (the network input through layers "
            "or parameters outside G-space, e.g. a normalization, an embedding, attention)")
  if lhs.kind in (Kind.STAT, Kind.PATTERN):
    return "its input is computed from statistics of other layers"
  return f"its input is {lhs.why or 'not a homogeneous function of one layer'}"


_ROLE_NOTE = {
    Role.SCALE: "a per-channel scale on the output of {}",
    Role.NORM_SCALE: "normalization scale (BatchNorm/LayerNorm-like)",
    Role.NORM_OFFSET: "normalization offset (BatchNorm/LayerNorm-like bias)",
}


def describe_role(t: TraceRecord, role: tuple[Role, Any]) -> str:
  """One use of a parameter leaf, in words.

  Args:
    t: the trace.
    role: ``(Role, detail)`` as recorded by the pass.

  Returns:
    E.g. ``"kernel of block1/conv1"``.
  """
  kind, detail = role
  if kind in (Role.KERNEL, Role.BIAS):
    rec = t.layers[detail]
    where = f" (in {rec.scope})" if "cond" in rec.scope else ""
    return f"{kind.value} of {rec.name}{where}"
  if kind is Role.UNSUPPORTED:
    return f"kernel of an unsupported layer: {detail}"
  if kind is Role.UNSUPPORTED_BIAS:
    return f"bias of the unsupported layer {detail}"
  if kind in (Role.NORM_SCALE, Role.NORM_OFFSET):
    note = _ROLE_NOTE[kind]
    if t.normalization == "reference":
      note += "; normalization='reference' chains run through it"
    return note
  if kind is Role.SCALE:
    return _ROLE_NOTE[kind].format(t.layers[detail].name)
  if kind is Role.LOOP:
    return str(detail)
  return f"used outside any layer kernel ({detail})"


def _runs(t: TraceRecord) -> tuple[list[list[int]], list[list[int]]]:
  """Chains (runs of two or more linked layers) and single layers, by layer index."""
  # Links A -> B: every use of A's output flows into B's input.
  succ: dict[int, int] = {}
  pred: dict[int, int] = {}
  for b, rec in enumerate(t.layers):
    if rec.excluded or rec.lhs.kind is not Kind.HOM:
      continue
    a = rec.lhs.layer
    if t.layers[a].excluded or (rec.lhs.flat is not None and rec.kind != "dense"):
      continue
    if t.terminals.get(a, []) == [(End.LAYER, b)]:
      succ[a], pred[b] = b, a

  chains, singles = [], []
  for b, rec in enumerate(t.layers):
    if rec.excluded or b in pred:
      continue
    run = [b]
    while run[-1] in succ:
      run.append(succ[run[-1]])
    (chains if len(run) > 1 else singles).append(run)
  return chains, singles


def build(t: TraceRecord) -> tuple[BasisPathStructure, list[tuple[str, str]]]:
  """The structure the trace describes, and why each chain starts and ends.

  Args:
    t: the trace, as filled by the dataflow pass.

  Returns:
    ``(structure, boundaries)``: the :class:`BasisPathStructure` (modulo skeleton not yet
    chosen) and, per chain, ``(layer names joined by " -> ", "starts: ...; ends: ...")``.

  Raises:
    ValueError: for a shared kernel or bias under ``unsupported='error'``.
  """
  # Weight sharing: a kernel or bias used anywhere else.
  shared: dict[Path, str] = {}
  for p, roles in t.roles.items():
    core = [r for r in roles if r[0] in (Role.KERNEL, Role.BIAS)]
    if core and len(roles) > 1:
      uses = ", ".join(describe_role(t, r) for r in roles)
      if t.unsupported == "error":
        raise ValueError(
            f"Parameter {path_str(p)!r} is used {len(roles)} times ({uses}): weight sharing. "
            "A G-space layer must own its kernel and bias. Pass unsupported='exclude' to "
            "trace_structure to train the layers that share it outside G-space, or build the "
            "structure by hand with gsgd_jax.chain_structure.")
      shared[p] = f"weight sharing, used {len(roles)} times ({uses})"
      for _, detail in core:
        t.layers[detail].excluded = "shares its parameters (weight sharing)"

  # A stacked leaf (layers scanned by an unrolled scan) is in G-space whole or not at all: the
  # layers of a stack that is not entirely in chains are taken out, and the chains found again.
  stack_notes: dict[Path, str] = {}
  while True:
    chains, singles = _runs(t)
    held = {p for run in chains for i in run for p in (t.layers[i].kernel, t.layers[i].bias)}
    out = {}
    for leaf, parts in t.slices.items():
      if not held & set(parts):
        continue
      missing = [sp for sp in (leaf + (StackIndex(i),) for i in range(t.shapes[leaf][0]))
                 if sp not in held]
      if t.roles.get(leaf):
        out[leaf] = ("the stacked leaf is also used outside the scan ("
                     + ", ".join(describe_role(t, r) for r in t.roles[leaf]) + ")")
      elif missing:
        out[leaf] = f"its slice {path_str(missing[0])} is not in a chain"
    if not out:
      break
    for leaf, why in out.items():
      stack_notes[leaf] = (f"a stack of layers (nn.scan / nnx.scan) is in G-space whole or not "
                           f"at all, and {why}")
      for rec in t.layers:
        if not rec.excluded and any(p is not None and is_slice(p) and p[:-1] == leaf
                                    for p in (rec.kernel, rec.bias)):
          rec.excluded = f"part of the stacked leaf {path_str(leaf)}, not in G-space whole"

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
        (names, f"starts: {start_reason(t, run[0])}; ends: {end_reason(t, run[-1])}"))

  notes: dict[Path, list[str]] = {}
  gspace = {p for c in built for l in c.layers for p in (l.kernel, l.bias) if p is not None}
  for run in singles:
    rec = t.layers[run[0]]
    notes.setdefault(rec.kernel, []).append(
        f"single layer: {start_reason(t, run[0])}; {end_reason(t, run[0])}")
    if rec.bias is not None:
      notes.setdefault(rec.bias, []).append(
          f"bias of the single layer {rec.name} (see {path_str(rec.kernel)})")
  for leaf, parts in t.slices.items():
    if all(sp in gspace for sp in parts):
      gspace.add(leaf)
      continue
    if leaf in stack_notes:
      notes.setdefault(leaf, []).append(stack_notes[leaf])
    by_note: dict[str, list[str]] = {}
    for sp in parts:
      for note in notes.get(sp, []) + ([shared[sp]] if sp in shared else []):
        by_note.setdefault(note, []).append(str(sp[-1]))
      for role in t.roles.get(sp, []):
        if role[0] not in (Role.KERNEL, Role.BIAS):
          by_note.setdefault(describe_role(t, role), []).append(str(sp[-1]))
    for note, where in by_note.items():
      notes.setdefault(leaf, []).append(f"slice{'s' if len(where) > 1 else ''} "
                                        f"{', '.join(where)}: {note}")
  for p in t.paths:
    if p in gspace:
      continue
    if p in shared:
      notes.setdefault(p, []).append(shared[p])
      continue
    for role in t.roles.get(p, []):
      if role[0] in (Role.KERNEL, Role.BIAS):
        continue
      notes.setdefault(p, []).append(describe_role(t, role))
    if p not in notes:
      notes[p] = ["not used by the traced function"]
  fallback = tuple(p for p in t.paths if p not in gspace)
  note_items = tuple((p, "; ".join(dict.fromkeys(notes[p]))) for p in fallback)
  return BasisPathStructure(built, fallback, note_items), boundaries


def format_report(t: TraceRecord, finish=None) -> str:
  """The text of :func:`gsgd_jax.tracing.trace_report` for a trace.

  Args:
    t: the trace.
    finish: applied to the structure before it is summarized (the skeleton choice and the
      BatchNorm scaling of :func:`gsgd_jax.trace_structure`); ``None``: as built.

  Returns:
    The structure's summary, one line per chain with why it starts and ends, and one line per
    loop whose body was not traced into.
  """
  structure, boundaries = build(t)
  if finish is not None:
    structure = finish(structure)
  lines = [structure.summary(), f"chain boundaries (normalization={t.normalization!r}):"]
  for ci, (names, why) in enumerate(boundaries):
    lines.append(f"  chain {ci} ({names}) {why}")
  if not boundaries:
    lines.append("  no chain of two or more layers: G-SGD reduces to the fallback optimizer")
  if t.loops:
    lines.append("loops (not traced into):")
    lines.extend(f"  {label}: {why}" for label, why in dict.fromkeys(t.loops))
  return "\n".join(lines)
