"""The basis-path structure of a ReLU network: chains of layers, skeleton weights, basis paths.

A *chain* is a sequence of layers ``l = 1..L`` through which data flows, each a kernel of shape
``(*taps, in, out)`` (a Dense kernel has no taps) with an optional bias. Hidden nodes (units, or
channels for convolutions) sit between consecutive layers. Following Meng et al. (2019) and the
convention of ``docs/method.md``:

* hidden node ``j`` of layer ``l`` has its *incoming skeleton edge* from node ``j mod h[l-1]`` and
  its *outgoing skeleton edge* to node ``j mod h[l+1]``, both at the centre tap. Indices are
  *skeleton positions*: with ``skeleton="modulo"`` position ``j`` is unit ``j``; with
  ``skeleton="aligned"`` each hidden layer's units are assigned to positions (a permutation
  chosen from the weights, :func:`align_skeleton`) so that skeleton edges carry large weights;
* every non-skeleton edge ``e = (i -> j)`` and every bias defines one *basis path*: follow the
  incoming skeleton edges back from ``i`` (product ``B(i)``), take ``e``, follow the outgoing
  skeleton edges forward from ``j`` (product ``F(j)``): ``v_e = B(i) w_e F(j)``;
* the remaining basis paths consist of skeleton edges only, one per *skeleton class* (a run of
  hidden nodes with the same index joined by diagonal skeleton edges). Each is stored at its
  *designated edge*: the incoming skeleton edge of the class's first node, which no other skeleton
  edge shares. A chain has ``m - H`` basis paths (``m`` edges including biases, ``H`` hidden nodes).

Everything here is static (shapes and paths, never array values) and is built once, outside jit.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gsgd_jax._tree import Path, as_path, leaves_with_paths, map_with_paths, natural_key, path_str

__all__ = [
    "Layer",
    "Chain",
    "BasisPathStructure",
    "infer_structure",
    "chain_structure",
    "skeleton_mask",
    "basis_path_mask",
    "rescale",
    "random_rescale",
    "reset_skeleton",
    "align_skeleton",
    "SKELETONS",
]

SKELETONS = ("aligned", "modulo")
"""Skeleton choices: ``"modulo"`` (the ``j mod h`` convention on unit indices) and ``"aligned"``
(the same convention on skeleton positions chosen from the weights, :func:`align_skeleton`)."""


@dataclasses.dataclass(frozen=True)
class Layer:
  """One layer of a chain: where its kernel (and bias) live in the params, and its shape.

  Attributes:
    kernel: canonical path of the kernel leaf.
    bias: canonical path of the bias leaf, or ``None``.
    kernel_shape: the kernel's shape as stored in the params.
    taps_shape: the tap dimensions. ``()`` for a Dense layer, the kernel size for a convolution,
      and the spatial shape ``(H, W)`` for a Dense layer fed by a flattened ``(H, W, C)`` feature
      map (its kernel ``(H*W*C, out)`` is read as ``(H, W, C, out)``: positions act as taps).
    normalized: the layer's output is normalized (BatchNorm/LayerNorm-like) inside the chain:
      only :func:`gsgd_jax.trace_structure` with ``normalization="reference"`` builds such chains;
      G-space optimizers then apply the reference code's norm scaling (``bn_scaling``) there.
  """

  kernel: Path
  bias: Path | None
  kernel_shape: tuple[int, ...]
  taps_shape: tuple[int, ...] = ()
  normalized: bool = False

  def __post_init__(self):
    t = math.prod(self.taps_shape)
    lead = math.prod(self.kernel_shape[:-1])
    if len(self.kernel_shape) < 2 or lead % t:
      raise ValueError(
          f"Kernel {path_str(self.kernel)!r} of shape {self.kernel_shape} cannot be read as "
          f"taps {self.taps_shape} x (in, out). Pass the right `taps_shape` for this layer.")

  @property
  def num_taps(self) -> int:
    return math.prod(self.taps_shape)

  @property
  def in_dim(self) -> int:
    return math.prod(self.kernel_shape[:-1]) // self.num_taps

  @property
  def out_dim(self) -> int:
    return self.kernel_shape[-1]

  @property
  def center_tap(self) -> int:
    """Flat index of the centre tap ``(k1//2, k2//2, ...)``: where skeleton edges live."""
    if not self.taps_shape:
      return 0
    return int(np.ravel_multi_index(tuple(k // 2 for k in self.taps_shape), self.taps_shape))

  @property
  def kind(self) -> str:
    if not self.taps_shape:
      return "dense"
    if len(self.kernel_shape) == 2:
      return "dense(flatten)"
    return f"conv{len(self.taps_shape)}d"

  @property
  def num_edges(self) -> int:
    return math.prod(self.kernel_shape) + (self.out_dim if self.bias is not None else 0)


@dataclasses.dataclass(frozen=True)
class Chain:
  """Layers through which data flows in order; each layer's ``out`` feeds the next one's ``in``."""

  layers: tuple[Layer, ...]
  perms: tuple[tuple[int, ...], ...] | None = None
  """Skeleton assignment of each hidden node set ``k = 1..L-1``: ``perms[k-1][p]`` is the unit at
  skeleton position ``p``. ``None``: the identity (``skeleton="modulo"``)."""

  def __post_init__(self):
    if not self.layers:
      raise ValueError("A chain needs at least one layer.")
    if self.perms is not None:
      h = self.widths
      if len(self.perms) != len(self.layers) - 1:
        raise ValueError(f"A chain of {len(self.layers)} layers has {len(self.layers) - 1} hidden "
                         f"node sets, got {len(self.perms)} skeleton permutations.")
      for k, perm in enumerate(self.perms, start=1):
        if sorted(perm) != list(range(h[k])):
          raise ValueError(f"Skeleton permutation of hidden set {k} (after "
                           f"{path_str(self.layers[k - 1].kernel)!r}) is not a permutation of "
                           f"range({h[k]}).")
    for a, b in zip(self.layers[:-1], self.layers[1:]):
      if a.out_dim != b.in_dim:
        raise ValueError(
            f"Shapes do not chain: {path_str(a.kernel)!r} has {a.out_dim} outputs but the next "
            f"layer {path_str(b.kernel)!r} expects {b.in_dim} inputs (kernel {b.kernel_shape}, "
            f"taps {b.taps_shape}). List the kernels in data-flow order, split them into separate "
            "chains, or give the flattened Dense layer its `taps_shape`.")

  @property
  def skeleton(self) -> str:
    """``"modulo"`` (identity assignment) or ``"aligned"`` (a permutation of some hidden set)."""
    if self.perms is None or all(tuple(p) == tuple(range(len(p))) for p in self.perms):
      return "modulo"
    return "aligned"

  def perm(self, k: int) -> np.ndarray:
    """Unit at each skeleton position of node set ``k`` (``0``: inputs, ``L``: outputs, both the
    identity).

    Args:
      k: the node set, ``0 .. L``.

    Returns:
      An int array of length ``h[k]``: ``perm(k)[position]`` is the unit there.
    """
    h = self.widths
    if self.perms is None or k == 0 or k == len(h) - 1:
      return np.arange(h[k])
    return np.asarray(self.perms[k - 1], np.int64)

  @property
  def widths(self) -> tuple[int, ...]:
    """``(h[0], h[1], ..., h[L])``: input width, hidden widths, output width."""
    return (self.layers[0].in_dim,) + tuple(l.out_dim for l in self.layers)

  @property
  def num_hidden(self) -> int:
    return sum(self.widths[1:-1])

  @property
  def num_edges(self) -> int:
    return sum(l.num_edges for l in self.layers)

  @property
  def num_basis_paths(self) -> int:
    return self.num_edges - self.num_hidden

  @property
  def num_skeleton_edges(self) -> int:
    h = self.widths
    return 2 * self.num_hidden - self._num_coincident

  @property
  def _num_coincident(self) -> int:
    # Diagonal skeleton edges (i, i), i < min(h[l-1], h[l]), between two hidden layers: the
    # incoming skeleton edge of one node is the outgoing skeleton edge of its parent.
    h = self.widths
    return sum(min(h[l - 1], h[l]) for l in range(2, len(h) - 1))

  @property
  def num_skeleton_paths(self) -> int:
    return self.num_hidden - self._num_coincident


class SkeletonIndex(NamedTuple):
  """Where the skeleton edges of one layer are, as static index vectors (numpy).

  Positions are skeleton positions (see :class:`Chain`), units are rows/columns of the kernel.
  """
  in_rows: np.ndarray    # (out,) for out position q: row of its incoming skeleton edge
  in_cols: np.ndarray    # (out,) for out position q: its unit (column)
  out_rows: np.ndarray   # (in,) for in position p: its unit (row)
  out_cols: np.ndarray   # (in,) for in position p: column of its outgoing skeleton edge
  parent: np.ndarray     # (out,) for out unit a: row of its incoming skeleton edge
  child: np.ndarray      # (in,) for in unit a: column of its outgoing skeleton edge
  identity: bool         # both node sets in unit order (the modulo convention)


@functools.lru_cache(maxsize=None)
def skeleton_index(chain: Chain, li: int) -> SkeletonIndex:
  """Static skeleton indices of layer ``li`` of ``chain`` (cached).

  Args:
    chain: the chain.
    li: the layer's index in the chain (0-based).

  Returns:
    A :class:`SkeletonIndex` of int32 numpy vectors (rows/columns of the layer's incoming and
    outgoing skeleton entries at the centre tap, by position and by unit).
  """
  layer = chain.layers[li]
  n_in, n_out = layer.in_dim, layer.out_dim
  p_in, p_out = chain.perm(li), chain.perm(li + 1)
  q, p = np.arange(n_out), np.arange(n_in)
  in_rows, in_cols = p_in[q % n_in], p_out
  out_rows, out_cols = p_in, p_out[p % n_out]
  parent = np.empty(n_out, np.int64)
  parent[in_cols] = in_rows
  child = np.empty(n_in, np.int64)
  child[out_rows] = out_cols
  identity = bool(np.all(p_in == p) and np.all(p_out == q))
  i32 = lambda a: np.asarray(a, np.int32)  # noqa: E731  (one index dtype with and without x64)
  return SkeletonIndex(i32(in_rows), i32(in_cols), i32(out_rows), i32(out_cols), i32(parent),
                       i32(child), identity)


def _skeleton_masks(chain: Chain, li: int):
  """Static numpy masks ``(in_skel, out_skel)`` of shape (in, out) at the centre tap."""
  layer = chain.layers[li]
  idx = skeleton_index(chain, li)
  in_skel = np.zeros((layer.in_dim, layer.out_dim), bool)
  out_skel = np.zeros_like(in_skel)
  if li < len(chain.layers) - 1:  # incoming skeleton edge of every hidden node of the out set
    in_skel[idx.in_rows, idx.in_cols] = True
  if li > 0:                      # outgoing skeleton edge of every hidden node of the in set
    out_skel[idx.out_rows, idx.out_cols] = True
  return in_skel, out_skel


@dataclasses.dataclass(frozen=True)
class BasisPathStructure:
  """Chains of layers in G-space plus the parameter leaves left to the fallback optimizer.

  Build it with :func:`infer_structure` (automatic, for a single Dense/Conv chain),
  :func:`chain_structure` (you list the kernels of each chain in data-flow order) or
  :func:`gsgd_jax.trace_structure` (discovery by tracing the model).

  Attributes:
    chains: the chains in G-space.
    fallback: canonical paths of params that are not in any chain (trained by the fallback).
    notes: reasons, per fallback path, why it is outside G-space.
  """

  chains: tuple[Chain, ...]
  fallback: tuple[Path, ...] = ()
  notes: tuple[tuple[Path, str], ...] = ()

  def __post_init__(self):
    seen: dict[Path, str] = {}
    for ci, c in enumerate(self.chains):
      for layer in c.layers:
        for p in (layer.kernel, layer.bias):
          if p is None:
            continue
          if p in seen:
            raise ValueError(f"Parameter {path_str(p)!r} appears in two places of the structure "
                             f"({seen[p]} and chain {ci}). Each parameter may belong to one layer.")
          seen[p] = f"chain {ci}"

  # -- static facts ---------------------------------------------------------------------------
  @property
  def gspace_paths(self) -> frozenset[Path]:
    out = set()
    for c in self.chains:
      for layer in c.layers:
        out.add(layer.kernel)
        if layer.bias is not None:
          out.add(layer.bias)
    return frozenset(out)

  @property
  def normalized_layers(self) -> tuple[Path, ...]:
    """Kernels of chain layers whose output is normalized (see :attr:`Layer.normalized`)."""
    return tuple(l.kernel for c in self.chains for l in c.layers if l.normalized)

  @property
  def num_basis_paths(self) -> int:
    return sum(c.num_basis_paths for c in self.chains)

  @property
  def num_hidden(self) -> int:
    return sum(c.num_hidden for c in self.chains)

  @property
  def num_edges(self) -> int:
    return sum(c.num_edges for c in self.chains)

  def summary(self) -> str:
    """A readable table: chains, layers, widths, ``m``, ``H``, ``m - H``, skeleton edges."""
    lines = [f"BasisPathStructure: {len(self.chains)} chain(s) in G-space, "
             f"m={self.num_edges} edges, H={self.num_hidden} hidden nodes, "
             f"m-H={self.num_basis_paths} basis paths"]
    for ci, c in enumerate(self.chains):
      lines.append(f"  chain {ci}: widths {'-'.join(map(str, c.widths))}, m={c.num_edges}, "
                   f"H={c.num_hidden}, basis paths={c.num_basis_paths} "
                   f"({c.num_skeleton_paths} skeleton-only), skeleton edges={c.num_skeleton_edges}, "
                   f"skeleton={c.skeleton}")
      for li, layer in enumerate(c.layers):
        taps = f" taps={layer.taps_shape} (skeleton at tap {tuple(int(i) for i in np.unravel_index(layer.center_tap, layer.taps_shape))})" if layer.taps_shape else ""
        bias = f" + {path_str(layer.bias)}" if layer.bias is not None else " (no bias)"
        lines.append(f"    [{li + 1}] {layer.kind:<14} {path_str(layer.kernel)}{bias}: "
                     f"{layer.in_dim} -> {layer.out_dim}{taps}")
    if self.fallback:
      why = dict(self.notes)
      lines.append(f"  fallback ({len(self.fallback)} leaves, trained outside G-space):")
      for p in self.fallback:
        lines.append(f"    {path_str(p)}" + (f": {why[p]}" if p in why else ""))
    return "\n".join(lines)

  def __str__(self) -> str:
    return self.summary()

  # -- saving and restoring -------------------------------------------------------------------
  def to_json(self) -> str:
    """The structure as JSON text, skeleton assignment included (save it with a checkpoint).

    A G-space optimizer state lives in the coordinates of one skeleton; a structure rebuilt
    from trained weights (``trace_structure`` or ``infer_structure`` on restored params) chooses
    another one. Save this text beside params and optimizer state, and resume with
    ``BasisPathStructure.from_json(text)``: the next updates equal the uninterrupted run's.

    Returns:
      Compact JSON text; ``BasisPathStructure.from_json(s.to_json()) == s``.
    """
    from gsgd_jax import _json
    return _json.to_json(self)

  def to_dict(self) -> dict:
    """The structure as a JSON-ready dict (for ``orbax.checkpoint.args.JsonSave``); see
    :meth:`to_json`.

    Returns:
      A dict of lists, strings, ints, bools and ``None``.
    """
    from gsgd_jax import _json
    return _json.to_dict(self)

  @classmethod
  def from_dict(cls, d: dict) -> "BasisPathStructure":
    """The structure saved by :meth:`to_dict`.

    Args:
      d: the dict (for example restored by ``orbax.checkpoint.args.JsonRestore``).

    Returns:
      The structure, equal to the one saved.

    Raises:
      ValueError: the dict is not a saved structure.
    """
    from gsgd_jax import _json
    return _json.from_dict(d, (Layer, Chain, cls))

  @classmethod
  def from_json(cls, text: str) -> "BasisPathStructure":
    """The structure saved by :meth:`to_json`.

    Args:
      text: the JSON text.

    Returns:
      The structure, equal to the one saved.

    Raises:
      ValueError: the text is not a saved structure.
    """
    from gsgd_jax import _json
    return _json.from_json(text, (Layer, Chain, cls))

  def _repr_pretty_(self, p, cycle):  # IPython / notebooks
    p.text(self.summary())

  # -- matching against a params tree ---------------------------------------------------------
  def check(self, tree: Any) -> dict[Path, Any]:
    """Checks that ``tree`` holds every layer with the right shape; returns ``{path: leaf}``.

    Args:
      tree: a params-shaped pytree (params, gradients, updates).

    Returns:
      ``{canonical path: leaf}`` of ``tree``.

    Raises:
      ValueError: naming the missing or mis-shaped parameter.
    """
    leaves = dict(leaves_with_paths(tree)[0])
    for ci, c in enumerate(self.chains):
      for layer in c.layers:
        for p, shape in ((layer.kernel, layer.kernel_shape), (layer.bias, (layer.out_dim,))):
          if p is None:
            continue
          if p not in leaves:
            raise ValueError(
                f"The structure expects parameter {path_str(p)!r} (chain {ci}) but the params "
                f"have no such leaf. Known leaves: {sorted(map(path_str, leaves))[:12]}... "
                "Rebuild the structure from these params.")
          leaf = leaves[p]
          if hasattr(leaf, "shape") and tuple(leaf.shape) != tuple(shape):
            raise ValueError(
                f"Parameter {path_str(p)!r} has shape {tuple(leaf.shape)} but the structure "
                f"expects {tuple(shape)}. Rebuild the structure from these params.")
          dtype = getattr(leaf, "dtype", None)
          if dtype is not None and not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(
                f"Parameter {path_str(p)!r} has dtype {np.dtype(dtype).name}: G-space needs real "
                "floating-point weights (integer weights make skeleton products 0 or wrap, "
                "complex ones have no positive rescaling). Cast the params, e.g. "
                "jax.tree.map(lambda x: x.astype(jnp.float32), params).")
    return leaves


# ------------------------------------------------------------------------------------------------
# Building structures
# ------------------------------------------------------------------------------------------------

def _layer_groups(tree: Any) -> tuple[list[tuple[Path, Path | None, tuple[int, ...]]], list[Path]]:
  """Finds ``kernel`` leaves (with a sibling ``bias``) in data-flow (natural) order."""
  leaves, _ = leaves_with_paths(tree)
  shapes = {p: tuple(np.shape(x)) for p, x in leaves}
  kernels = [p for p in shapes if p and p[-1] == "kernel"]
  kernels.sort(key=natural_key)
  used = set()
  groups = []
  for k in kernels:
    b = k[:-1] + ("bias",)
    bias = b if b in shapes else None
    groups.append((k, bias, shapes[k]))
    used.add(k)
    if bias is not None:
      used.add(bias)
  rest = [p for p in shapes if p not in used]
  return groups, rest


def _auto_layer(path: Path, bias: Path | None, shape: tuple[int, ...], prev_out: int | None) -> Layer:
  if len(shape) == 2:
    if prev_out is not None and shape[0] != prev_out and shape[0] % prev_out == 0:
      # Dense after a flattened (positions, channels) feature map: positions act as taps.
      return Layer(path, bias, shape, (shape[0] // prev_out,))
    return Layer(path, bias, shape, ())
  if len(shape) >= 3:
    return Layer(path, bias, shape, tuple(shape[:-2]))
  raise ValueError(f"Unsupported kernel {path_str(path)!r} of shape {shape}: G-space needs Dense "
                   "(in, out) or Conv (*taps, in, out) kernels.")


def infer_structure(params: Any, skeleton: str = "aligned") -> BasisPathStructure:
  """Infers a single chain from the ``kernel``/``bias`` leaves of ``params``.

  Works for linen ``variables['params']``, ``nnx.state(model, nnx.Param)`` (wrapped or not) and
  plain nested dicts. Layers are ordered by data flow as names encode it: natural order of their
  paths (``Dense_2`` before ``Dense_10``; nnx ``layers/2`` before ``layers/10``). A Dense layer
  after convolutions continues the chain either after global pooling (``in == channels``) or after
  flattening (``in == positions * channels``; positions act as taps). Leaves that are not kernels
  or biases (normalization scales, embeddings, ...) go to the fallback.

  For networks that are not one chain (residual nets, several heads), use
  :func:`gsgd_jax.trace_structure` or :func:`chain_structure`.

  Args:
    params: the params pytree.
    skeleton: ``"aligned"`` (default): the skeleton is chosen from the weights of ``params``
      (:func:`align_skeleton`; needs concrete arrays); ``"modulo"``: the ``j mod h`` convention
      on unit indices (only paths and shapes are read).

  Returns:
    The structure: one chain, every other leaf in the fallback.

  Raises:
    ValueError: if the kernels do not chain, naming the two layers.

  Examples:
    >>> import jax.numpy as jnp
    >>> params = {'Dense_0': {'kernel': jnp.ones((3, 4)), 'bias': jnp.zeros(4)},
    ...           'Dense_1': {'kernel': jnp.ones((4, 2))}}
    >>> s = infer_structure(params, skeleton="modulo")
    >>> s.chains[0].widths, s.num_basis_paths
    ((3, 4, 2), 20)
  """
  groups, rest = _layer_groups(params)
  if not groups:
    raise ValueError("No `kernel` leaves found in the params: nothing to optimize in G-space. "
                     "Pass an explicit structure (gsgd_jax.chain_structure) or use a plain optimizer.")
  layers = []
  prev_out = None
  for k, b, shape in groups:
    layers.append(_auto_layer(k, b, shape, prev_out))
    prev_out = shape[-1]
  chain = Chain(tuple(layers))
  notes = tuple((p, "not a kernel or bias of a chained layer") for p in rest)
  return with_skeleton(BasisPathStructure((chain,), tuple(rest), notes), params, skeleton)


def chain_structure(params: Any, chains: Sequence[Sequence[Any]],
                    skeleton: str = "aligned") -> BasisPathStructure:
  """Builds a structure from kernel paths you list, chain by chain, in data-flow order.

  Args:
    params: the params pytree (only paths and shapes are read).
    chains: for each chain, its layers in data-flow order. A layer is a kernel path
      (``'block/conv1/kernel'`` or a tuple of keys), or a ``(kernel_path, taps_shape)`` pair for a
      Dense layer fed by a flattened feature map with spatial shape ``taps_shape``. A sibling
      ``bias`` leaf is picked up automatically.
    skeleton: ``"aligned"`` or ``"modulo"``, see :func:`infer_structure`.

  Returns:
    The structure; every other leaf goes to the fallback.

  Examples:
    >>> import jax.numpy as jnp
    >>> params = {'a': {'kernel': jnp.ones((3, 4))}, 'b': {'kernel': jnp.ones((4, 2))},
    ...           'scale': jnp.ones(2)}
    >>> s = chain_structure(params, [['a/kernel', 'b/kernel']], skeleton="modulo")
    >>> [''.join(p) for p in s.fallback]
    ['scale']
  """
  leaves, _ = leaves_with_paths(params)
  shapes = {p: tuple(np.shape(x)) for p, x in leaves}
  built = []
  for spec in chains:
    layers = []
    for item in spec:
      taps = None
      if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], tuple) and (
          not item[1] or isinstance(item[1][0], int)) and not isinstance(item[0], int):
        item, taps = item
      p = as_path(item)
      if p not in shapes:
        raise ValueError(f"Kernel {path_str(p)!r} is not in the params. "
                         f"Known leaves: {sorted(map(path_str, shapes))}")
      shape = shapes[p]
      b = p[:-1] + ("bias",) if p[-1] == "kernel" else None
      bias = b if b in shapes else None
      if taps is None:
        taps = tuple(shape[:-2]) if len(shape) >= 3 else ()
      layers.append(Layer(p, bias, shape, tuple(taps)))
    built.append(Chain(tuple(layers)))
  structure = BasisPathStructure(tuple(built))
  rest = tuple(p for p in shapes if p not in structure.gspace_paths)
  structure = dataclasses.replace(structure, fallback=rest,
                                  notes=tuple((p, "not listed in any chain") for p in rest))
  return with_skeleton(structure, params, skeleton)


# ------------------------------------------------------------------------------------------------
# Choosing the skeleton from the weights
# ------------------------------------------------------------------------------------------------

_LOG_FLOOR = -69.0  # log|w| of a zero weight (about log(1e-30)): such an edge is avoided


def _concrete_leaves(params: Any, why: str) -> dict[Path, np.ndarray]:
  leaves = leaves_with_paths(params)[0]
  for p, x in leaves:
    if isinstance(x, jax.core.Tracer) or not hasattr(x, "shape") or isinstance(
        x, jax.ShapeDtypeStruct):
      raise ValueError(
          f"{why} needs concrete parameter values, but {path_str(p)!r} is {type(x).__name__}. "
          "Build the structure outside jit from the initialized params, or pass "
          "skeleton='modulo' (chosen from shapes only).")
  return {p: x for p, x in leaves}


def _center_logs(layer: Layer, kernel) -> np.ndarray:
  """``log|W|`` at the centre tap, ``(in, out)``, float64, zeros floored."""
  k = np.asarray(kernel)
  if not jnp.issubdtype(k.dtype, jnp.floating):  # bfloat16/float16 are floating; ints, complex not
    raise ValueError(f"Kernel {path_str(layer.kernel)!r} has dtype {k.dtype}: G-space needs real "
                     "floating-point weights (cast integer params to float; complex weights have "
                     "no positive rescaling).")
  k = np.abs(k.astype(np.float64)).reshape(layer.num_taps, layer.in_dim, layer.out_dim)
  with np.errstate(divide="ignore", invalid="ignore"):
    out = np.log(k[layer.center_tap])
  return np.where(np.isfinite(out), out, _LOG_FLOOR)


def _align_chain(chain: Chain, leaves: dict[Path, Any]) -> tuple[tuple[int, ...], ...]:
  """Skeleton positions of each hidden set, chosen set after set (a linear assignment each)."""
  from scipy.optimize import linear_sum_assignment  # scipy ships with jax

  h = chain.widths
  L = len(chain.layers)
  logs = [_center_logs(layer, leaves[layer.kernel]) for layer in chain.layers]
  perms = [np.arange(h[0])]
  for k in range(1, L):
    n_prev, n = h[k - 1], h[k]
    w = logs[k - 1][perms[k - 1]]  # rows in skeleton-position order of set k-1
    # Skeleton edges between set k-1 and set k, as (position p, position q) pairs: the incoming
    # edge of every q, and (set k-1 hidden) the outgoing edge of every p.
    edges = {(q % n_prev, q) for q in range(n)}
    if k > 1:
      edges |= {(p, p % n) for p in range(n_prev)}
    ps, qs = (np.asarray(a) for a in zip(*sorted(edges)))
    cost = np.zeros((n, n))
    np.add.at(cost, qs, w[ps])
    cost /= np.bincount(qs, minlength=n)[:, None]
    if k == L - 1:  # last hidden set: its outgoing edges to the (fixed) outputs as well
      cost += logs[k][:, np.arange(n) % h[L]].T
    rows, cols = linear_sum_assignment(cost, maximize=True)
    perm = np.empty(n, np.int64)
    perm[rows] = cols
    # Positions with the same skeleton edges (a set wider than the one before: several positions
    # share a parent) have identical cost rows, so the solver's order among them is arbitrary.
    # Order the units it gave such a group by an invariant key instead: the log of the incoming
    # skeleton weight plus the mean log|w| of the unit's outgoing weights (a rescaling of the unit
    # cancels; the parent's and the children's factors are common to the group).
    # (The last hidden set's cost already cancels the unit's factor: its own value is the key.)
    unit_key = np.empty(n)
    unit_key[perm] = cost[np.arange(n), perm] + (logs[k].mean(axis=1)[perm] if k < L - 1 else 0.0)
    groups: dict[tuple, list[int]] = {}
    for q in range(n):
      groups.setdefault((tuple(ps[qs == q]), q % h[L] if k == L - 1 else None), []).append(q)
    for group in groups.values():
      if len(group) > 1:
        units = perm[group]
        perm[group] = units[np.argsort(-unit_key[units], kind="stable")]
    perms.append(perm)
  return tuple(tuple(int(i) for i in p) for p in perms[1:])


def align_skeleton(structure: BasisPathStructure, params: Any) -> BasisPathStructure:
  """The structure with each chain's skeleton chosen from the weights of ``params``.

  Any assignment of a hidden layer's units to skeleton positions gives a valid basis (the ``j mod
  h`` convention up to a relabelling), and the G-space update is exact for every one of them. This
  picks, hidden set after hidden set (inputs first), the assignment that maximizes the mean of
  ``log|w|`` over the skeleton edges at each position (centre taps of convolutions; the last hidden
  set also counts its edges to the outputs): skeleton edges carry large weights, so skeleton path
  values and the products ``B``, ``F`` are not tiny. Each step is a linear assignment
  (``scipy.optimize.linear_sum_assignment``, ``O(h^3)``; about 1 s for 4096 units).

  The choice is invariant under the positive scaling group: rescaling hidden unit ``u`` by ``c``
  adds ``log c`` to every entry of ``u``'s column (the mean over a position's edges into ``u``
  makes that exactly ``log c``, and the last set's outgoing term subtracts it), so every
  assignment's total shifts by the same constant, while the previous set's factors shift whole
  rows. A rescaled network gets the same skeleton. Ties between assignments (for example equal
  weights) are broken by the solver.

  Args:
    structure: a structure (its current skeleton is ignored).
    params: params with concrete values (outside jit); they are not modified.

  Returns:
    The structure with ``Chain.perms`` set (static data: hashable, usable as a jit static arg).

  Examples:
    >>> import jax.numpy as jnp
    >>> params = {'Dense_0': {'kernel': jnp.array([[0.1, 2.0], [3.0, 0.2]])},
    ...           'Dense_1': {'kernel': jnp.array([[1.0], [1.0]])}}
    >>> align_skeleton(infer_structure(params, skeleton="modulo"), params).chains[0].perms
    ((1, 0),)
  """
  leaves = _concrete_leaves(params, "skeleton='aligned'")
  structure.check(params)
  chains = tuple(dataclasses.replace(c, perms=_align_chain(c, leaves) if len(c.layers) > 1
                                     else None) for c in structure.chains)
  return dataclasses.replace(structure, chains=chains)


def with_skeleton(structure: BasisPathStructure, params: Any, skeleton: str) -> BasisPathStructure:
  """``structure`` with the ``skeleton`` of :data:`SKELETONS` (``"aligned"``: from ``params``).

  Args:
    structure: the basis-path structure (its chains are kept, only the skeleton changes).
    params: concrete params (read by ``"aligned"`` only).
    skeleton: ``"aligned"`` or ``"modulo"``.

  Returns:
    The structure with the chosen skeleton.
  """
  if skeleton == "aligned":
    return align_skeleton(structure, params)
  if skeleton == "modulo":
    return dataclasses.replace(structure, chains=tuple(
        dataclasses.replace(c, perms=None) for c in structure.chains))
  raise ValueError(f"Unknown skeleton {skeleton!r}: choose one of {SKELETONS}.")


# ------------------------------------------------------------------------------------------------
# Inspecting and acting on params
# ------------------------------------------------------------------------------------------------

def _layer_masks(chain: Chain, li: int):
  """Boolean (T, in, out) numpy masks: skeleton edges and designated (basis-path) skeleton edges."""
  layer = chain.layers[li]
  L = len(chain.layers)
  in_skel, out_skel = _skeleton_masks(chain, li)
  skel = np.zeros((layer.num_taps, layer.in_dim, layer.out_dim), bool)
  skel[layer.center_tap] = in_skel | out_skel
  des = np.zeros_like(skel)
  des[layer.center_tap] = in_skel & ~out_skel
  return skel, des


def _per_leaf(structure: BasisPathStructure, params: Any, kernel_fn, bias_fn, other_fn):
  structure.check(params)
  where: dict[Path, tuple[int, int, bool]] = {}
  for ci, c in enumerate(structure.chains):
    for li, layer in enumerate(c.layers):
      where[layer.kernel] = (ci, li, True)
      if layer.bias is not None:
        where[layer.bias] = (ci, li, False)

  def fn(path, x):
    if path not in where:
      return other_fn(x)
    ci, li, is_kernel = where[path]
    chain = structure.chains[ci]
    return kernel_fn(chain, li, x) if is_kernel else bias_fn(chain, li, x)

  return map_with_paths(fn, params)


def skeleton_mask(structure: BasisPathStructure, params: Any) -> Any:
  """Boolean pytree like ``params``: True at skeleton weights (biases and fallback leaves False).

  Args:
    structure: the basis-path structure.
    params: the params pytree (only shapes are read).

  Returns:
    A boolean pytree like ``params``.
  """
  def kernel(chain, li, x):
    skel, _ = _layer_masks(chain, li)
    return jnp.asarray(skel.reshape(np.shape(x)))
  return _per_leaf(structure, params, kernel, lambda c, li, x: jnp.zeros(np.shape(x), bool),
                   lambda x: jnp.zeros(np.shape(x), bool))


def basis_path_mask(structure: BasisPathStructure, params: Any) -> Any:
  """Boolean pytree like ``params``: True where :func:`gsgd_jax.basis_path_values` stores a basis path.

  That is every non-skeleton weight, every bias, and the designated edge of each skeleton-only
  path. Summing the mask over the G-space leaves gives ``structure.num_basis_paths``.

  Args:
    structure: the basis-path structure.
    params: the params pytree (only shapes are read).

  Returns:
    A boolean pytree like ``params`` (False at fallback leaves).
  """
  def kernel(chain, li, x):
    skel, des = _layer_masks(chain, li)
    return jnp.asarray((~skel | des).reshape(np.shape(x)))
  return _per_leaf(structure, params, kernel, lambda c, li, x: jnp.ones(np.shape(x), bool),
                   lambda x: jnp.zeros(np.shape(x), bool))


def _hidden_factor_tree(structure: BasisPathStructure, params: Any, factors) -> Any:
  def kernel(chain, li, x):
    L = len(chain.layers)
    ci = structure.chains.index(chain)
    col = factors[ci][li] if li < L - 1 else None
    row = factors[ci][li - 1] if li > 0 else None
    layer = chain.layers[li]
    k = x.reshape(layer.num_taps, layer.in_dim, layer.out_dim)
    if col is not None:
      k = k * col.astype(x.dtype)[None, None, :]
    if row is not None:
      k = k / row.astype(x.dtype)[None, :, None]
    return k.reshape(x.shape)

  def bias(chain, li, x):
    L = len(chain.layers)
    ci = structure.chains.index(chain)
    return x * factors[ci][li].astype(x.dtype) if li < L - 1 else x

  return _per_leaf(structure, params, kernel, bias, lambda x: x)


def rescale(structure: BasisPathStructure, params: Any, factors: Sequence[Sequence[Any]]) -> Any:
  """Applies the positive scaling group: hidden node ``u`` scaled by ``c_u > 0``.

  All edges into ``u`` (and its bias) are multiplied by ``c_u``, all edges out of ``u`` divided by
  ``c_u``. The network function, all path values and the loss are unchanged.

  Args:
    structure: the basis-path structure.
    params: the params pytree (nnx ``Param`` wrappers are kept).
    factors: ``factors[chain][l]`` is a positive vector of length ``h[l+1]`` for each hidden layer.

  Returns:
    The rescaled params (same tree and dtypes).
  """
  for ci, c in enumerate(structure.chains):
    if len(factors[ci]) != len(c.layers) - 1:
      raise ValueError(f"Chain {ci} has {len(c.layers) - 1} hidden layers, got "
                       f"{len(factors[ci])} factor vectors.")
  factors = [[jnp.asarray(f) for f in fc] for fc in factors]
  return _hidden_factor_tree(structure, params, factors)


def random_rescale(structure: BasisPathStructure, params: Any, key: jax.Array,
                   max_factor: float = 10.0) -> tuple[Any, list[list[jax.Array]]]:
  """Rescales by random factors, log-uniform in ``[1/max_factor, max_factor]``.

  Args:
    structure: the basis-path structure.
    params: the params pytree.
    key: a ``jax.random`` key.
    max_factor: the largest factor (and ``1 / max_factor`` the smallest).

  Returns:
    ``(rescaled_params, factors)``.
  """
  factors = []
  for c in structure.chains:
    fc = []
    for width in c.widths[1:-1]:
      key, sub = jax.random.split(key)
      fc.append(jnp.exp(jax.random.uniform(sub, (width,), minval=-1.0, maxval=1.0)
                        * np.log(max_factor)))
    factors.append(fc)
  return rescale(structure, params, factors), factors


def reset_skeleton(structure: BasisPathStructure, params: Any, value: float = 1.0,
                   others_scale: float = 1.0) -> Any:
  """Sets every skeleton weight to ``value`` (the reference code's initialization uses 1.0).

  Args:
    structure: the basis-path structure.
    params: the params pytree.
    value: the new value of every skeleton weight.
    others_scale: multiplies the non-skeleton weights (the reference code's ``blue_init``); useful
      for deep chains, whose activations grow layer by layer once the skeleton is set to 1.

  Returns:
    The params with every skeleton weight set (same tree and dtypes). This changes the network
    function; do it once, right after initialization.
  """
  def kernel(chain, li, x):
    skel, _ = _layer_masks(chain, li)
    return jnp.where(jnp.asarray(skel.reshape(np.shape(x))), jnp.asarray(value, x.dtype),
                     x * jnp.asarray(others_scale, x.dtype))
  return _per_leaf(structure, params, kernel, lambda c, li, x: x, lambda x: x)
