"""Static layout of the G-space arithmetic: per-layer views and masks, the flat per-node plan of
all chains, per-chain leaf access, and the sharding context of a params tree.

Everything here is built from the structure alone (numpy, cached) or is a thin jnp helper used by
the exact core (:mod:`gsgd_jax.pathspace`), the path coordinates (:mod:`gsgd_jax._scales`) and the
BatchNorm heuristic (:mod:`gsgd_jax._bn`).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gsgd_jax._tree import Path, is_slice, restack
from gsgd_jax.structure import BasisPathStructure, Chain, SkeletonIndex, skeleton_index


def compute_dtype(dtype) -> jnp.dtype:
  """The dtype G-space arithmetic runs in: at least float32 (bf16/f16 are promoted).

  Args:
    dtype: a parameter dtype.

  Returns:
    ``dtype`` promoted to at least float32.
  """
  return jnp.promote_types(dtype, jnp.float32)


# ----------------------------------------------------------------------------------------------
# Static index vectors and masks
# ----------------------------------------------------------------------------------------------
# Skeleton edges are O(h) per layer: they are read with gathers at static indices (O(h) work),
# while full-size masks compare an iota with a broadcast index vector (no per-element modulo),
# so they fuse into the single elementwise pass over each kernel.

class _Work(NamedTuple):
  """How a kernel is viewed during the update: ``(*taps, in, out)`` with the centre tap at
  ``center``. Dense kernels keep their own rank ``(in, out)`` and convolutions theirs
  ``(kh, kw, in, out)``, so the update is written into the donated kernel buffer in place (a
  reshaped view would force XLA to copy each new kernel); only a Dense layer read with taps
  (after a flatten) is reshaped to ``(T, in, out)``."""
  shape: tuple[int, ...]
  center: tuple[int, ...]  # index of the centre tap in the leading (tap) axes

  @property
  def ntaps(self) -> int:
    return len(self.center)

  def row(self, vec):  # per-input-node vector -> broadcastable over the kernel
    return vec.reshape((1,) * self.ntaps + (-1, 1))

  def col(self, vec):  # per-output-node vector -> broadcastable over the kernel
    return vec.reshape((1,) * self.ntaps + (1, -1))

  def row_sum(self, x):  # sum over taps and outputs
    return jnp.sum(x, axis=tuple(range(self.ntaps)) + (self.ntaps + 1,))

  def center_mask(self):
    """``(*taps, 1, 1)`` bool marking the centre tap, or ``None`` when every entry is central."""
    return self._taps_equal(self.center, (1, 1))

  def tap_index(self, flat):
    """Flat tap indices (row-major over the taps) as an index tuple over the tap axes."""
    if self.ntaps == 1:
      return (flat,)
    xp = np if isinstance(flat, np.ndarray) else jnp
    return tuple(xp.unravel_index(flat, self.shape[:self.ntaps]))

  def tap_mask(self, flat, axis: int):
    """``(*taps, in|1, out|1)`` bool: the tap ``flat[u]`` of every unit ``u`` of the kernel's
    rows (``axis=0``) or columns (``axis=1``) is True (``flat``: ``(in,)`` or ``(out,)``)."""
    return self._taps_equal(self.tap_index(flat), (-1, 1) if axis == 0 else (1, -1))

  def _taps_equal(self, index, tail):
    """AND over the tap axes longer than 1 of ``iota == index[axis]`` (each index reshaped to
    ``(1,) * ntaps + tail``); ``None`` when no tap axis is longer than 1."""
    taps = self.shape[:self.ntaps]
    out = None
    for ax, t in enumerate(index):
      if taps[ax] == 1:
        continue
      m = jax.lax.broadcasted_iota(jnp.int32, taps + (1, 1), ax) == jnp.reshape(
          jnp.asarray(t, jnp.int32), (1,) * self.ntaps + tail)
      out = m if out is None else out & m
    return out


def skeleton_entries(work: _Work, idx: SkeletonIndex, kernel, incoming: bool, lo: int = 0):
  """A layer's incoming (``incoming``) or outgoing skeleton weights from its kernel (work shape;
  numpy or jax), in skeleton-position order from position ``lo`` on (gathers, O(h))."""
  if incoming:
    rows, cols, taps = idx.in_rows[lo:], idx.in_cols[lo:], idx.in_taps
  else:
    rows, cols, taps = idx.out_rows[lo:], idx.out_cols[lo:], idx.out_taps
  if taps is None:
    return kernel[work.center][rows, cols]
  return kernel[work.tap_index(taps[lo:]) + (rows, cols)]


def _work(layer) -> _Work:
  ks, taps = layer.kernel_shape, layer.taps_shape
  if len(ks) == 2 and layer.num_taps == 1:
    return _Work((layer.in_dim, layer.out_dim), ())
  if tuple(ks[:-2]) == tuple(taps):
    return _Work(tuple(ks), tuple(t // 2 for t in taps))
  return _Work((layer.num_taps, layer.in_dim, layer.out_dim), (layer.center_tap,))


def _and(a, b):
  return b if a is None else a & b


class _Masks(NamedTuple):
  """Where a kernel's skeleton entries are. Masks are ``None`` when statically empty, so the
  common cases cost nothing in the pass over the kernel: the last layer has no incoming and the
  first no outgoing skeleton edges, and a layer with ``out <= in`` between hidden layers has no
  designated edges (its skeleton is the diagonal ``i == j``, one ``iota`` compare)."""
  skeleton: jax.Array | None    # (*taps|1, in, out) bool: every skeleton edge
  designated: jax.Array | None  # (*taps|1, in, out) bool: designated edges (skeleton-only paths)
  idx: SkeletonIndex     # static skeleton indices (rows/columns by position and by unit)
  work: _Work
  parent_tap: Any = None  # (out,) tap of each out unit's incoming skeleton edge; None: centre

  def in_skeleton(self, kernel, lo: int = 0):
    """Incoming skeleton entries of the out set (kernel in work shape), in skeleton-position
    order from position ``lo`` (gather, O(h))."""
    return skeleton_entries(self.work, self.idx, kernel, True, lo)

  def out_skeleton(self, kernel):
    """Outgoing skeleton entries of the in set, in skeleton-position order (gather, O(h))."""
    return skeleton_entries(self.work, self.idx, kernel, False)

  def by_position(self, row_vec):
    """A per-in-unit vector (e.g. a row sum) in skeleton-position order of the in set."""
    return row_vec if self.idx.identity else row_vec[self.idx.out_rows]


def _where(mask, x, y):
  return y if mask is None else jnp.where(mask, x, y)


def _masks(chain: Chain, li: int) -> _Masks:
  layer = chain.layers[li]
  n_in, n_out = layer.in_dim, layer.out_dim
  idx = skeleton_index(chain, li)
  last = li == len(chain.layers) - 1
  first = li == 0
  rows = lambda: jax.lax.broadcasted_iota(jnp.int32, (n_in, n_out), 0)  # noqa: E731
  cols = lambda: jax.lax.broadcasted_iota(jnp.int32, (n_in, n_out), 1)  # noqa: E731
  # incoming skeleton edge of hidden node j: (parent(j), j); the diagonal when out <= in (modulo
  # skeleton); a compare with a broadcast static index vector otherwise
  in_skel = None if last else (rows() == cols() if idx.identity and n_out <= n_in
                               else rows() == idx.parent.astype(np.int32)[None, :])
  # outgoing skeleton edge of hidden node i: (i, child(i)); the diagonal when in <= out (modulo)
  out_skel = None if first else (rows() == cols() if idx.identity and n_in <= n_out
                                 else cols() == idx.child.astype(np.int32)[:, None])
  return _combine(chain, li, in_skel, out_skel, idx, idx.parent_tap, idx.child_tap)


def _materialize(*vecs: jax.Array):
  """Computes per-node vectors once instead of once per kernel entry (returns them, pinned).

  XLA:CPU otherwise fuses the O(h) vector arithmetic (ratios, clips, products of scales) into the
  O(m) elementwise pass over each kernel and re-evaluates it for every entry (about 30 instead of
  8 multiplies per weight). A reduction is never fused into its consumers, so a (trivial) sum over
  a leading axis of 2 pins the vectors, all equal-length ones in one reduction. Only on CPU: on
  accelerators each pinned vector would cost a kernel launch, which matters more there than the
  recomputation (unmeasured, see docs/performance.md).
  """
  if jax.default_backend() != "cpu":
    return vecs if len(vecs) > 1 else vecs[0]
  stacked = jnp.stack(vecs)
  pinned = jnp.sum(jnp.stack([stacked, jnp.zeros_like(stacked)]), axis=0)
  return tuple(pinned) if len(vecs) > 1 else pinned[0]


# ----------------------------------------------------------------------------------------------
# Per-node vectors of all chains, flat
# ----------------------------------------------------------------------------------------------
# All hidden nodes live in one flat vector (chain after chain; in each, node set 1, then 2, ...,
# L-1), so the O(h) arithmetic (logs, exps, clips, ratios) is a handful of operations in all
# instead of a dozen per layer: fewer, larger fusions, and a compile time that grows slowly with
# depth. (`path_gradients` and `allocate` each compute B and F from the params; inside one jitted
# step XLA merges the two copies.) The three
# recursions along a chain (B along incoming skeleton edges, F along outgoing ones, the row sums
# BK along a skeleton class) are sums along static pointer chains, computed by pointer jumping:
# ceil(log2(depth)) static gathers of the flat vector.

class _Plan(NamedTuple):
  """Static (numpy) layout of the hidden nodes of one or more chains in one flat vector.

  Node ``(k, u)`` of chain ``c`` is at ``offsets[c][k] + u``; index ``N`` is the sentinel.
  """
  widths: tuple[tuple[int, ...], ...]   # per chain: (h[0], ..., h[L])
  offsets: tuple[tuple[int, ...], ...]  # per chain: offsets[c][k] for hidden sets k = 1..L-1
  size: int                 # number of hidden nodes N
  parent: np.ndarray        # (N,) incoming skeleton edge: (k, j) -> (k-1, j mod h[k-1])
  child: np.ndarray         # (N,) outgoing skeleton edge: (k, i) -> (k+1, i mod h[k+1])
  next: np.ndarray          # (N,) same class, next set: (k, u) -> (k+1, u) if u < h[k+1]
  heads: tuple[tuple[int, int, int], ...]  # (c, k, lo): nodes u >= lo of set k start a class
  first: np.ndarray         # (N,) position of each node's class head among all heads
  units: tuple[tuple[np.ndarray | None, ...], ...]  # per chain and set k: flat index of each
  # unit (kernel row/column order), or None when units are in skeleton-position order

  def hidden(self, c: int, k: int) -> slice:
    return slice(self.offsets[c][k], self.offsets[c][k] + self.widths[c][k])

  def by_unit(self, vec, c: int, k: int):
    """The entries of flat ``vec`` (skeleton-position order) for set ``k`` of chain ``c``, in
    unit order (a static slice, or an O(h) gather for an aligned skeleton)."""
    units = self.units[c][k]
    return vec[self.hidden(c, k)] if units is None else vec[units]


def _plan_of(chains) -> _Plan:
  return _plan(tuple(chain.widths for chain in chains), tuple(chain.perms for chain in chains))


@functools.lru_cache(maxsize=None)
def _plan(widths: tuple[tuple[int, ...], ...], perms=None) -> _Plan:
  """The flat layout. Nodes are in skeleton-position order (``perms``: each chain's
  ``Chain.perms``), so every pointer below follows the ``j mod h`` convention."""
  n = sum(sum(h[1:-1]) for h in widths)
  parent, child, nxt, first = (np.full(n, n, np.int32) for _ in range(4))
  all_offsets, heads, base, count = [], [], 0, 0
  for c, h in enumerate(widths):
    L = len(h) - 1
    offsets = [base] * L
    for k in range(2, L):
      offsets[k] = offsets[k - 1] + h[k - 1]
    for k in range(1, L):
      u = np.arange(h[k])
      at = offsets[k] + u
      if k > 1:
        parent[at] = offsets[k - 1] + u % h[k - 1]
      if k < L - 1:
        child[at] = offsets[k + 1] + u % h[k + 1]
        cont = u < h[k + 1]
        nxt[at[cont]] = offsets[k + 1] + u[cont]
      # Class heads (first nodes of skeleton classes): all of set 1, and the nodes u >= h[k-1] of
      # a set wider than the one before. Every other node (k, u) continues the class of (k-1, u).
      lo = 0 if k == 1 else h[k - 1]
      head_pos = count + u - lo
      if k > 1:
        prev = first[np.minimum(offsets[k - 1] + u, n - 1)]
        first[at] = np.where(u < lo, prev, head_pos)
      else:
        first[at] = head_pos
      if h[k] > lo:
        heads.append((c, k, lo))
        count += h[k] - lo
    all_offsets.append(tuple(offsets))
    base += sum(h[1:L])
  units = []
  for c, h in enumerate(widths):
    pc = None if perms is None else perms[c]
    row = [None] * len(h)
    for k in range(1, len(h) - 1):
      if pc is not None and tuple(pc[k - 1]) != tuple(range(h[k])):
        row[k] = (all_offsets[c][k] + np.argsort(np.asarray(pc[k - 1]))).astype(np.int32)
    units.append(tuple(row))
  return _Plan(tuple(widths), tuple(all_offsets), n, parent, child, nxt, tuple(heads), first,
               tuple(units))


def _chain_sum(vals, ptr: np.ndarray):
  """``out[..., n] = vals[..., n] + vals[..., ptr[n]] + vals[..., ptr[ptr[n]]] + ...`` up to the
  sentinel ``N`` (the last axis holds the ``N`` nodes); numpy in, numpy out.

  Pointer jumping with static pointers: each round doubles the covered length of every chain.
  """
  xp = np if isinstance(vals, np.ndarray) else jnp
  n = vals.shape[-1]
  v = xp.concatenate([vals, xp.zeros(vals.shape[:-1] + (1,), vals.dtype)], axis=-1)
  p = np.concatenate([ptr, [n]]).astype(np.int32)
  while np.any(p[:n] != n):
    v = v + v[..., p]
    p = p[p]
  return v[..., :n]


def _flat(vectors: list[jax.Array]) -> jax.Array:
  return vectors[0] if len(vectors) == 1 else jnp.concatenate(vectors)


# ----------------------------------------------------------------------------------------------
# Per-chain leaf access
# ----------------------------------------------------------------------------------------------

def _chain_leaves(chain: Chain, leaves: dict[Path, Any], dtype=None):
  """The chain's kernels in their work shape (see ``_Work``) and biases (or None), cast to
  ``dtype`` if given."""
  ks, bs = [], []
  for layer in chain.layers:
    k = jnp.asarray(leaves[layer.kernel])
    k = k.reshape(_work(layer).shape)
    ks.append(k.astype(dtype) if dtype is not None else k)
    if layer.bias is None:
      bs.append(None)
    else:
      b = jnp.asarray(leaves[layer.bias])
      bs.append(b.astype(dtype) if dtype is not None else b)
  return ks, bs


def _chain_dtype(chain: Chain, leaves: dict[Path, Any]):
  return compute_dtype(jnp.result_type(*[leaves[l.kernel] for l in chain.layers]))


def _groups(structure: BasisPathStructure, lookup: dict[Path, Any], *trees: dict[Path, Any]):
  """Chains of the same compute dtype, processed together: their hidden nodes share one flat
  per-node vector, so a residual net's many short chains cost a handful of O(h) operations in all
  rather than per chain. Yields ``(chains, masks, leaves)`` with ``leaves[t][c] = (kernels,
  biases)`` of chain ``c`` read from ``(lookup, *trees)[t]`` in the compute dtype."""
  by_dtype: dict[Any, list[Chain]] = {}
  for chain in structure.chains:
    by_dtype.setdefault(_chain_dtype(chain, lookup), []).append(chain)
  for dtype, chains in by_dtype.items():
    masks = [[_masks(c, li) for li in range(len(c.layers))] for c in chains]
    leaves = [[_chain_leaves(c, t, dtype) for c in chains] for t in (lookup,) + trees]
    yield chains, masks, leaves


def _rebuild(tree: Any, new: dict[Path, jax.Array], leaves: list[tuple[Path, Any]], treedef):
  new = restack(new)  # slices of stacked leaves (scanned layers) back into their leaves
  out = [new[p].astype(jnp.asarray(x).dtype) if p in new else x for p, x in leaves]
  return jax.tree_util.tree_unflatten(treedef, out)


def _auto_axes(fn, like: Any):
  """``fn``, run with Auto mesh axes when ``like`` has leaves on a mesh with Explicit axes.

  The kernels index skeleton entries with gathers at static indices, which explicit sharding
  types reject on a split axis; inside ``auto_axes`` XLA partitions them, and the outputs get the
  shardings of ``like``'s leaves (the output tree has ``like``'s layout).
  """
  if _explicit_mesh(like) is None:
    return fn
  return jax.sharding.auto_axes(fn, out_sharding=jax.tree.map(lambda x: jax.typeof(x).sharding, like))


def _explicit_mesh(tree: Any):
  """The mesh of the first leaf of ``tree`` sharded over a mesh with Explicit axes, or None."""
  for x in jax.tree.leaves(tree):
    s = getattr(jax.typeof(x), "sharding", None)
    if (isinstance(s, jax.sharding.NamedSharding)
        and jax.sharding.AxisType.Explicit in s.mesh.axis_types):
      return s.mesh
  return None


def _mul(*xs):
  """Product of the given factors, skipping ``None`` (= 1); ``None`` if all are."""
  out = None
  for x in xs:
    if x is not None:
      out = x if out is None else out * x
  return out


def _inv(x):
  return None if x is None else 1.0 / x


# ----------------------------------------------------------------------------------------------
# Per-layer evaluation, vectorized over stacked layers
# ----------------------------------------------------------------------------------------------
# A stack of layers (nn.scan / nnx.scan over layers) is one leaf (n, *kernel); the structure
# addresses slice i as its own layer. The O(h) per-node vectors are computed per slice (they are
# chained through the flat plan), but the O(m) pass over the kernels runs once per stacked leaf:
# `jax.vmap` of the per-layer body over the whole leaf and the stacked O(h) vectors, when all
# slices share the body's static branches. Slicing the leaf instead (reductions over slices,
# a concatenation of the results) measured 2-4x slower on XLA:CPU.

def _traced_masks(chain: Chain, li: int, parent, child, parent_tap=None, child_tap=None
                  ) -> _Masks:
  """:func:`_masks` of layer ``li`` with the skeleton's index vectors as (traced) arguments
  (``parent``: ``(out,)`` row of each unit's incoming skeleton edge; ``child``: ``(in,)`` column
  of each unit's outgoing one; ``parent_tap``/``child_tap``: their taps, ``None`` for centre
  taps), so that layers with different skeletons share one program."""
  layer = chain.layers[li]
  n_in, n_out = layer.in_dim, layer.out_dim
  last, first = li == len(chain.layers) - 1, li == 0
  rows = jax.lax.broadcasted_iota(jnp.int32, (n_in, n_out), 0)
  cols = jax.lax.broadcasted_iota(jnp.int32, (n_in, n_out), 1)
  in_skel = None if last else rows == parent[None, :]
  out_skel = None if first else cols == child[:, None]
  return _combine(chain, li, in_skel, out_skel, None, parent_tap, child_tap)


def _combine(chain: Chain, li: int, in_skel, out_skel, idx, parent_tap=None, child_tap=None
             ) -> _Masks:
  """The masks of layer ``li`` from its incoming and outgoing skeleton edges (``(in, out)`` bool,
  ``None`` when statically empty), restricted to the centre tap, or to the tap of each edge
  (``parent_tap``: ``(out,)`` of each unit's incoming edge, ``child_tap``: ``(in,)`` of each
  unit's outgoing edge; both ``None`` for centre taps)."""
  layer = chain.layers[li]
  work = _work(layer)
  if parent_tap is not None or child_tap is not None:
    in_skel = None if in_skel is None else in_skel & work.tap_mask(parent_tap, 1)
    out_skel = None if out_skel is None else out_skel & work.tap_mask(child_tap, 0)
  if in_skel is None or out_skel is None:
    skeleton = out_skel if in_skel is None else in_skel
  elif layer.in_dim == layer.out_dim:
    skeleton = in_skel  # the same edges: the incoming skeleton edges are the outgoing ones
  else:
    skeleton = in_skel | out_skel
  # designated: incoming skeleton edges that are not also an outgoing one, (p, j) with
  # p mod out != j; statically empty unless this is the first layer or out > in.
  designated = None
  if _has_designated(chain, li):
    designated = in_skel if out_skel is None else in_skel & ~out_skel
  if parent_tap is None and child_tap is None:
    center = work.center_mask()
    skeleton = None if skeleton is None else _and(center, skeleton)
    designated = None if designated is None else _and(center, designated)
  return _Masks(skeleton, designated, idx, work, parent_tap)


def _has_designated(chain: Chain, li: int) -> bool:
  layer = chain.layers[li]
  n_in, n_out = layer.in_dim, layer.out_dim
  last, first = li == len(chain.layers) - 1, li == 0
  parent = np.arange(n_out) % n_in
  return not last and (first or bool(np.any(parent % n_out != np.arange(n_out))))


def _shape_of(x):
  return None if x is None else tuple(jnp.shape(x))


def _run_layers(chains, masks, lookups, dtype, inputs, vecs, body, new: dict,
                vectorize: bool = True) -> None:
  """Evaluates ``body`` for every layer of ``chains`` and stores the results in ``new``.

  Args:
    chains, masks: a group of :func:`_groups`.
    lookups: ``{path: leaf}`` dicts (slices included) of the trees the body reads.
    dtype: the compute dtype.
    inputs: ``inputs[c][li] = (kernels, biases)``: the layer's kernel (work shape) and bias (or
      ``None``) read from each tree of ``lookups``, in ``dtype``.
    vecs: ``vecs[c][li]``: a tuple of the layer's O(h) vectors and scalars (``None``: 1/absent).
    body: ``body(masks, kernels, biases, vecs, (first, last, normalized)) -> (kernel, bias)``.
    new: ``{path: array}`` the results are written to (a stacked leaf whole, when vectorized).
    vectorize: evaluate stacked layers at once (``False``: slice by slice, from ``inputs``).
  """
  groups: dict[tuple, list[tuple[int, int]]] = {}
  for c, chain in enumerate(chains if vectorize else ()):
    L = len(chain.layers)
    for li, layer in enumerate(chain.layers):
      if not is_slice(layer.kernel):
        continue
      key = (layer.kernel[:-1], layer.bias is None, layer.kernel_shape, layer.taps_shape,
             li == 0, li == L - 1, layer.normalized, _has_designated(chain, li),
             tuple(_shape_of(v) for v in vecs[c][li]))
      groups.setdefault(key, []).append((c, li))
  done = set()
  for key, members in groups.items():
    leaf = key[0]
    n = int(np.shape(lookups[0][leaf])[0])
    members.sort(key=lambda m: chains[m[0]].layers[m[1]].kernel[-1].index)
    if [chains[c].layers[li].kernel[-1].index for c, li in members] != list(range(n)):
      continue  # the stack's slices need different programs: evaluated one by one below
    c0, li0 = members[0]
    chain0, layer0 = chains[c0], chains[c0].layers[li0]
    work = _work(layer0)
    ks = [jnp.asarray(t[leaf]).reshape((n,) + work.shape).astype(dtype) for t in lookups]
    bs = None
    if layer0.bias is not None:
      bs = [jnp.asarray(t[layer0.bias[:-1]]).astype(dtype) for t in lookups]
    index = [skeleton_index(chains[c], li) for c, li in members]
    parent = jnp.asarray(np.stack([i.parent for i in index]))
    child = jnp.asarray(np.stack([i.child for i in index]))
    ptap = ctap = None
    if any(i.parent_tap is not None for i in index):
      center = layer0.center_tap
      ptap = jnp.asarray(np.stack([np.full(layer0.out_dim, center, np.int32)
                                   if i.parent_tap is None else i.parent_tap for i in index]))
      ctap = jnp.asarray(np.stack([np.full(layer0.in_dim, center, np.int32)
                                   if i.child_tap is None else i.child_tap for i in index]))
    stacked_vecs = tuple(None if vecs[c0][li0][j] is None else
                         jnp.stack([jnp.asarray(vecs[c][li][j], dtype) for c, li in members])
                         for j in range(len(vecs[c0][li0])))
    flags = (li0 == 0, li0 == len(chain0.layers) - 1, layer0.normalized)

    def one(parent, child, ptap, ctap, ks, bs, v, chain0=chain0, li0=li0, flags=flags):
      return body(_traced_masks(chain0, li0, parent, child, ptap, ctap), ks, bs, v, flags)

    k_out, b_out = jax.vmap(one)(parent, child, ptap, ctap, ks, bs, stacked_vecs)
    new[leaf] = k_out.reshape((n,) + layer0.kernel_shape)
    if layer0.bias is not None:
      new[layer0.bias[:-1]] = b_out
    done.update(members)
  for c, chain in enumerate(chains):
    L = len(chain.layers)
    for li, layer in enumerate(chain.layers):
      if (c, li) in done:
        continue
      ks, bs = inputs[c][li]
      k_out, b_out = body(masks[c][li], ks, bs, vecs[c][li], (li == 0, li == L - 1,
                                                               layer.normalized))
      new[layer.kernel] = k_out.reshape(layer.kernel_shape)
      if layer.bias is not None:
        new[layer.bias] = b_out
