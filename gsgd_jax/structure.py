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
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from gsgd_jax._tree import Path, is_slice, leaf_path, leaves_with_paths, path_str, with_slices

__all__ = ["Layer", "Chain", "BasisPathStructure", "SKELETONS", "BN_SCALINGS"]

BN_SCALINGS = ("weight", "noweight", None)
"""Values of :attr:`BasisPathStructure.bn_scaling`."""

SKELETONS = ("aligned", "modulo")
"""Skeleton choices: ``"modulo"`` (the ``j mod h`` convention on unit indices) and ``"aligned"``
(the same convention on skeleton positions chosen from the weights, :func:`align_skeleton`)."""


@dataclasses.dataclass(frozen=True)
class Layer:
  """One layer of a chain: where its kernel (and bias) live in the params, and its shape.

  Attributes:
    kernel: canonical path of the kernel leaf; for layer ``i`` of a stack made with ``nn.scan`` /
      ``nnx.scan`` (one leaf ``(n, *kernel)`` for ``n`` layers), the leaf's path plus
      ``StackIndex(i)`` (written ``'.../kernel[i]'``).
    bias: canonical path of the bias leaf (or of its slice), or ``None``.
    kernel_shape: the kernel's shape as stored in the params (of one slice, for a stack).
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
  taps: tuple[tuple[tuple[int, ...], tuple[int, ...]] | None, ...] | None = None
  """The tap of each skeleton edge of a layer with taps (a convolution): ``taps[l] = (in_taps,
  out_taps)``, flat tap indices (row-major over ``taps_shape``) of the incoming skeleton edge of
  every out position and of the outgoing skeleton edge of every in position. ``None`` (for the
  chain or a layer): the centre tap everywhere (the paper's convention). ``skeleton="aligned"``
  picks each channel pair's largest tap (:func:`align_skeleton`). An edge that is both an incoming
  and an outgoing skeleton edge has one tap."""

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
    if self.taps is not None:
      self._check_taps()
    for a, b in zip(self.layers[:-1], self.layers[1:]):
      if a.out_dim != b.in_dim:
        raise ValueError(
            f"Shapes do not chain: {path_str(a.kernel)!r} has {a.out_dim} outputs but the next "
            f"layer {path_str(b.kernel)!r} expects {b.in_dim} inputs (kernel {b.kernel_shape}, "
            f"taps {b.taps_shape}). List the kernels in data-flow order, split them into separate "
            "chains, or give the flattened Dense layer its `taps_shape`.")

  def _check_taps(self):
    if len(self.taps) != len(self.layers):
      raise ValueError(f"A chain of {len(self.layers)} layers needs {len(self.layers)} entries of "
                       f"skeleton taps (None for a layer at its centre taps), got {len(self.taps)}.")
    bare = dataclasses.replace(self, taps=None)  # the same skeleton edges, at centre taps
    for li, (layer, t) in enumerate(zip(self.layers, self.taps)):
      if t is None:
        continue
      name = path_str(layer.kernel)
      if (len(t) != 2 or len(t[0]) != layer.out_dim or len(t[1]) != layer.in_dim
          or any(not 0 <= int(i) < layer.num_taps for i in (*t[0], *t[1]))):
        raise ValueError(
            f"Skeleton taps of {name!r} must be (one tap per output channel, one per input "
            f"channel) = ({layer.out_dim}, {layer.in_dim}) flat indices in range("
            f"{layer.num_taps}); rebuild them with align_skeleton(structure, params).")
      idx = skeleton_index(bare, li)
      at = {}
      if li < len(self.layers) - 1:
        at.update(zip(zip(idx.in_rows.tolist(), idx.in_cols.tolist()), t[0]))
      if li > 0:
        for e, tap in zip(zip(idx.out_rows.tolist(), idx.out_cols.tolist()), t[1]):
          if at.setdefault(e, tap) != tap:
            raise ValueError(
                f"Skeleton taps of {name!r} disagree on the edge {e} (both an incoming and an "
                f"outgoing skeleton edge): taps {at[e]} and {tap}. Rebuild them with "
                "align_skeleton(structure, params).")

  def layer_taps(self, li: int) -> tuple[np.ndarray, np.ndarray] | None:
    """``(in_taps, out_taps)`` of layer ``li`` as int arrays (see :attr:`taps`), or ``None`` when
    every skeleton edge of the layer is at the centre tap."""
    t = None if self.taps is None else self.taps[li]
    if t is None:
      return None
    c = self.layers[li].center_tap
    a, b = np.asarray(t[0], np.int64), np.asarray(t[1], np.int64)
    used_in = a if li < len(self.layers) - 1 else a[:0]
    used_out = b if li > 0 else b[:0]
    if np.all(used_in == c) and np.all(used_out == c):
      return None
    return a, b

  @property
  def skeleton(self) -> str:
    """``"modulo"`` (identity assignment, centre taps) or ``"aligned"`` (a permutation of some
    hidden set, or a skeleton edge away from its centre tap)."""
    if ((self.perms is None or all(tuple(p) == tuple(range(len(p))) for p in self.perms))
        and all(self.layer_taps(li) is None for li in range(len(self.layers)))):
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
  in_taps: np.ndarray | None = None    # (out,) for out position q: tap of its incoming edge
  out_taps: np.ndarray | None = None   # (in,) for in position p: tap of its outgoing edge
  parent_tap: np.ndarray | None = None  # (out,) for out unit a: tap of its incoming edge
  child_tap: np.ndarray | None = None   # (in,) for in unit a: tap of its outgoing edge
  # (the four tap vectors are flat tap indices, None when every skeleton edge is at the centre)


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
  taps = chain.layer_taps(li)
  if taps is None:
    return SkeletonIndex(i32(in_rows), i32(in_cols), i32(out_rows), i32(out_cols), i32(parent),
                         i32(child), identity)
  in_taps, out_taps = taps
  parent_tap = np.empty(n_out, np.int64)
  parent_tap[in_cols] = in_taps
  child_tap = np.empty(n_in, np.int64)
  child_tap[out_rows] = out_taps
  return SkeletonIndex(i32(in_rows), i32(in_cols), i32(out_rows), i32(out_cols), i32(parent),
                       i32(child), identity, i32(in_taps), i32(out_taps), i32(parent_tap),
                       i32(child_tap))


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
  bn_scaling: str | None = None
  """The reference code's BatchNorm heuristic on the layers flagged :attr:`Layer.normalized`
  (only ``trace_structure(..., normalization='reference')`` flags any; it sets this to its
  ``bn_scaling`` argument, ``'weight'`` by default): ``'weight'`` scales path gradients,
  ``'noweight'`` the path-space update, ``None`` neither (see ``docs/method.md``). No effect on
  layers that are not flagged. Not scale-invariant."""

  def __post_init__(self):
    if self.bn_scaling not in BN_SCALINGS:
      raise ValueError(f"bn_scaling must be 'weight', 'noweight' or None, got {self.bn_scaling!r}.")
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
    stacks: dict[Path, set[int]] = {}
    for p in seen:
      if is_slice(p):
        stacks.setdefault(p[:-1], set()).add(p[-1].index)
    for base, idx in stacks.items():
      if base in seen:
        raise ValueError(f"Parameter {path_str(base)!r} is in the structure both whole and by "
                         "slices (stacked layers). Address a stacked leaf by slices only.")
      if idx != set(range(len(idx))):
        raise ValueError(
            f"The structure holds slices {sorted(idx)} of the stacked leaf {path_str(base)!r}: "
            "a stacked leaf (nn.scan / nnx.scan over layers) is in G-space whole, every slice "
            "0..n-1 a layer of some chain, or not at all.")

  # -- static facts ---------------------------------------------------------------------------
  @property
  def layer_paths(self) -> tuple[Path, ...]:
    """Paths of every chain layer's kernel and bias (slices of stacked leaves included)."""
    return tuple(p for c in self.chains for l in c.layers for p in (l.kernel, l.bias)
                 if p is not None)

  @property
  def gspace_paths(self) -> frozenset[Path]:
    """The params leaves in G-space (a stacked leaf once, by its own path)."""
    return frozenset(leaf_path(p) for p in self.layer_paths)

  @property
  def stacked(self) -> frozenset[Path]:
    """The stacked leaves (``nn.scan``/``nnx.scan`` over layers) whose slices are chain layers."""
    return frozenset(p[:-1] for p in self.layer_paths if is_slice(p))

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
        taps = ""
        if layer.taps_shape:
          where = ("a chosen tap per channel pair" if c.layer_taps(li) is not None else
                   f"tap {tuple(int(i) for i in np.unravel_index(layer.center_tap, layer.taps_shape))}")
          taps = f" taps={layer.taps_shape} (skeleton at {where})"
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
  def leaves(self, tree: Any) -> dict[Path, Any]:
    """``{path: leaf}`` of ``tree``, plus ``{slice path: slice}`` of its stacked chain layers
    (unchecked; :meth:`check` validates)."""
    return with_slices(dict(leaves_with_paths(tree)[0]),
                       [p for p in self.layer_paths if is_slice(p)])

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
    stacks = {}
    for p in self.layer_paths:
      if is_slice(p):
        stacks[p[:-1]] = max(stacks.get(p[:-1], 0), p[-1].index + 1)
    for base, n in stacks.items():
      leaf = leaves.get(base)
      if leaf is not None and hasattr(leaf, "shape") and leaf.shape and leaf.shape[0] > n:
        raise ValueError(
            f"The structure holds slices 0..{n - 1} of the stacked leaf {path_str(base)!r} of "
            f"{leaf.shape[0]} layers: a stacked leaf (nn.scan / nnx.scan over layers) is in "
            "G-space whole, every slice 0..n-1 a layer of some chain, or not at all.")
      if leaf is not None and hasattr(leaf, "shape") and (not leaf.shape or leaf.shape[0] != n):
        raise ValueError(
            f"Parameter {path_str(base)!r} has shape {tuple(leaf.shape)} but the structure holds "
            f"it as a stack of {n} layers (shape ({n}, ...)). Rebuild the structure from these "
            "params.")
    for ci, c in enumerate(self.chains):
      for layer in c.layers:
        for p, shape in ((layer.kernel, layer.kernel_shape), (layer.bias, (layer.out_dim,))):
          if p is None:
            continue
          if leaf_path(p) not in leaves:
            raise ValueError(
                f"The structure expects parameter {path_str(leaf_path(p))!r} (chain {ci}) but "
                f"the params have no such leaf. Known leaves: "
                f"{sorted(map(path_str, leaves))[:12]}... Rebuild the structure from these params.")
          leaf = leaves[leaf_path(p)]
          have = tuple(leaf.shape[1:] if is_slice(p) else leaf.shape) if hasattr(
              leaf, "shape") else None
          if have is not None and have != tuple(shape):
            raise ValueError(
                f"Parameter {path_str(p)!r} has shape {have} but the structure "
                f"expects {tuple(shape)}. Rebuild the structure from these params.")
          dtype = getattr(leaf, "dtype", None)
          if dtype is not None and not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(
                f"Parameter {path_str(p)!r} has dtype {np.dtype(dtype).name}: G-space needs real "
                "floating-point weights (integer weights make skeleton products 0 or wrap, "
                "complex ones have no positive rescaling). Cast the params, e.g. "
                "jax.tree.map(lambda x: x.astype(jnp.float32), params).")
    return with_slices(leaves, [p for p in self.layer_paths if is_slice(p)])


_MOVED = {name: module for module, names in (
    ("builders", ("infer_structure", "chain_structure")),
    ("skeleton", ("align_skeleton", "with_skeleton")),
    ("gauge", ("skeleton_mask", "basis_path_mask", "rescale", "random_rescale", "reset_skeleton")),
) for name in names}


def __getattr__(name):
  if name in _MOVED:
    raise AttributeError(
        f"gsgd_jax.structure.{name} moved to gsgd_jax.{_MOVED[name]}.{name} in gsgd_jax 0.2 "
        f"(the public spelling gsgd_jax.{name} is unchanged where it existed). See CHANGELOG.md.")
  raise AttributeError(f"module 'gsgd_jax.structure' has no attribute {name!r}")
