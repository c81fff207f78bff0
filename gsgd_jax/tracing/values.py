"""What the dataflow pass knows about each value, and what it records about layers and parameters.

:class:`Kind` is the lattice of value kinds, :class:`Value` one value's description,
:class:`End` why a layer's chain ends at a use of its output, :class:`Role` what a parameter leaf
is used for, and :class:`TraceRecord` everything the pass found (turned into a structure by
:mod:`gsgd_jax.tracing.report`).
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

import jax.numpy as jnp
import numpy as np

from gsgd_jax._tree import Path, is_slice, path_str

__all__ = ["Kind", "End", "Role", "Value", "FREE", "LayerRecord", "TraceRecord", "deps",
           "is_zero", "is_float", "layer_name"]


class Kind(enum.Enum):
  """What a value is, as far as the positive scaling group of hidden channels is concerned."""

  CONST = "const"        #: a known constant (:attr:`Value.const`)
  FREE = "free"          #: depends on no parameter and no layer output (inputs, random masks)
  PARAM = "param"        #: depends on parameters that are not layer outputs (a norm scale)
  HOM = "hom"            #: positively homogeneous, channel-wise function of one layer's output
  PATTERN = "pattern"    #: a scale-invariant function of layer outputs (a sign pattern)
  STAT = "stat"          #: a statistic of layer outputs (mean of squares, variance, ...)
  CENTERED = "centered"  #: a homogeneous value plus an offset, waiting for a normalization
  MIXED = "mixed"        #: anything else that depends on layer outputs

  @property
  def invariant(self) -> bool:
    """Does not change under the scaling group (may multiply a homogeneous value)."""
    return self in (Kind.CONST, Kind.FREE, Kind.PARAM, Kind.PATTERN)

  @property
  def homogeneous(self) -> bool:
    """``HOM`` or ``CENTERED``: a layer output that a chain may still run through."""
    return self in (Kind.HOM, Kind.CENTERED)


class End(enum.Enum):
  """Why a use of a layer's output ends its chain (recorded with a detail)."""

  LAYER = "layer"              #: feeds a layer (detail: the layer's index)
  OUTPUT = "output"            #: is a network output
  SUM = "sum"                  #: is summed with another branch
  MUL = "mul"                  #: is multiplied by another activation
  NORM = "norm"                #: is normalized
  MIX = "mix"                  #: an operation mixes its channels (detail: the operation)
  OFFSET = "offset"            #: gets an offset (detail: the operation)
  OP = "op"                    #: a non-homogeneous operation (detail: the operation)
  UNSUPPORTED = "unsupported"  #: feeds an unsupported layer (detail: its name)


class Role(enum.Enum):
  """What a parameter leaf is used for (recorded with a detail, one entry per use)."""

  KERNEL = "kernel"                      #: kernel of a layer (detail: the layer's index)
  BIAS = "bias"                          #: bias of a layer (detail: the layer's index)
  SCALE = "scale"                        #: per-channel scale on a layer output (detail: index)
  NORM_SCALE = "norm_scale"              #: normalization scale
  NORM_OFFSET = "norm_offset"            #: normalization offset
  UNSUPPORTED = "unsupported"            #: kernel of an unsupported layer (detail: the problem)
  UNSUPPORTED_BIAS = "unsupported_bias"  #: bias of an unsupported layer (detail: its name)
  LOOP = "loop"                          #: read inside a loop body (detail: the explanation)
  OTHER = "other"                        #: any other use (detail: the operation)


@dataclasses.dataclass(frozen=True)
class Value:
  """One value of the traced function, as the dataflow pass sees it.

  Attributes:
    kind: the :class:`Kind`.
    const: the constant (``Kind.CONST`` only; ``None`` if too large to fold).
    view: ``(param path, row-major copy of the whole leaf?, axis of a vector leaf or None)`` when
      the value is a parameter leaf, possibly reshaped, cast or broadcast.
    params: the parameter leaves it depends on (outside layers).
    layers: the layers (indices) whose outputs it depends on, besides ``layer``.
    layer: ``Kind.HOM``/``CENTERED``: the layer it is a homogeneous function of.
    flat: ``Kind.HOM``: the spatial shape of a flattened ``(..., H, W, C)`` feature map.
    normalized: computed from a normalized layer output.
    norm: computed through ``rsqrt``/``sqrt``: a normalizer.
    why: ``Kind.MIXED``: what the value is, for messages.
    pending: ``Kind.CENTERED``: ``(End, detail)``, the chain end if no normalization follows.
    unsupported: output of an unsupported layer (its name), before its bias.
  """

  kind: Kind
  const: np.ndarray | None = None
  view: tuple | None = None
  params: frozenset = frozenset()
  layers: frozenset = frozenset()
  layer: int | None = None
  flat: tuple[int, ...] | None = None
  normalized: bool = False
  norm: bool = False
  why: str = ""
  pending: tuple[End, Any] | None = None
  unsupported: str | None = None

  @property
  def invariant(self) -> bool:
    """Does not change under the scaling group (may multiply a homogeneous value)."""
    return self.kind.invariant


FREE = Value(Kind.FREE)


def deps(v: Value) -> frozenset:
  """The layers whose outputs ``v`` depends on.

  Args:
    v: a traced value.

  Returns:
    The frozenset of layer indices (``v.layer`` included when set).
  """
  return v.layers | {v.layer} if v.layer is not None else v.layers


def is_zero(v: Value) -> bool:
  """``v`` is a known constant equal to zero everywhere.

  Args:
    v: a traced value.

  Returns:
    True for a constant whose every entry is zero.
  """
  return v.kind is Kind.CONST and v.const is not None and not np.any(v.const)


def is_float(dtype) -> bool:
  """``dtype`` is a floating (or complex) dtype.

  Args:
    dtype: anything ``jnp.issubdtype`` accepts (other inputs give False).

  Returns:
    True for inexact dtypes.
  """
  try:
    return jnp.issubdtype(dtype, jnp.inexact)
  except TypeError:
    return False


def layer_name(kernel: Path) -> str:
  """``('block1', 'conv1', 'kernel')`` -> ``'block1/conv1'``.

  Args:
    kernel: the canonical path of a kernel leaf.

  Returns:
    The layer's name: the path without a trailing ``kernel``, joined by ``/``.
  """
  if is_slice(kernel):  # layer i of a stack: 'stack/Dense_0[2]'
    return layer_name(kernel[:-1]) + str(kernel[-1])
  return path_str(kernel[:-1]) if len(kernel) > 1 and kernel[-1] == "kernel" else path_str(kernel)


@dataclasses.dataclass
class LayerRecord:
  """A Dense or Conv layer found in the trace.

  Attributes:
    kernel: path of its kernel leaf.
    shape: the kernel's shape.
    kind: ``"dense"`` or ``"conv"``.
    lhs: the :class:`Value` of its input.
    bias: path of its bias leaf, once found.
    excluded: why it is kept out of G-space (weight sharing), or ``None``.
    scope: the enclosing calls of its ``dot_general``/``conv``, for messages.
  """

  kernel: Path
  shape: tuple[int, ...]
  kind: str
  lhs: Value
  bias: Path | None = None
  excluded: str | None = None
  scope: str = ""

  @property
  def name(self) -> str:
    """The layer's name: the kernel path without its last ``kernel`` entry."""
    return layer_name(self.kernel)


@dataclasses.dataclass
class TraceRecord:
  """Everything the dataflow pass found; turned into a structure by ``report.build``.

  Attributes:
    paths, shapes: the parameter leaves, in flatten order, and their shapes.
    normalization, unsupported: the policies of :func:`gsgd_jax.trace_structure`.
    layers: the layers, in data-flow order (indices are layer ids).
    terminals: per layer, the ``(End, detail)`` of every use of its output that ends its chain.
    roles: per parameter leaf, the ``(Role, detail)`` of every use.
    normalized: the layers whose output gets normalized.
    loops: ``(operation label, explanation)`` of every loop the pass did not look into.
    slices: per stacked leaf read by an unrolled scan, the paths of its slices (``leaf[i]``:
      parameters of their own, with shapes in ``shapes``).
  """

  paths: list[Path]
  shapes: dict[Path, tuple[int, ...]]
  normalization: str
  unsupported: str
  layers: list[LayerRecord] = dataclasses.field(default_factory=list)
  terminals: dict[int, list[tuple[End, Any]]] = dataclasses.field(default_factory=dict)
  roles: dict[Path, list[tuple[Role, Any]]] = dataclasses.field(default_factory=dict)
  normalized: set[int] = dataclasses.field(default_factory=set)
  loops: list[tuple[str, str]] = dataclasses.field(default_factory=list)
  slices: dict[Path, list[Path]] = dataclasses.field(default_factory=dict)

  def add_slice(self, leaf: Path, path: Path, shape: tuple[int, ...]) -> None:
    """Records ``path``, a slice of the stacked leaf ``leaf`` read by an unrolled scan."""
    self.shapes[path] = shape
    if path not in self.slices.setdefault(leaf, []):
      self.slices[leaf].append(path)

  def end(self, layer: int, kind: End, detail: Any = "") -> None:
    """Records that a use of ``layer``'s output ends its chain."""
    self.terminals.setdefault(layer, []).append((kind, detail))

  def role(self, v: Value, kind: Role, detail: Any = "") -> None:
    """Records a use of the parameter leaf ``v`` is a view of (nothing if it is none)."""
    if v.view is not None:
      self.roles.setdefault(v.view[0], []).append((kind, detail))
