"""G-space arithmetic: path values, the inverse chain rule, and the exact weight allocation.

Notation (``docs/gsgd-method.md``): node sets ``k = 0..L`` of a chain (``0`` inputs, ``L``
outputs), layer ``l`` maps set ``l`` to set ``l + 1``; ``B(i)`` is the product of incoming skeleton
weights from node ``i`` back to an input, ``F(j)`` the product of outgoing skeleton weights from
``j`` forward to an output. All functions here are pure, jit-able and cost ``O(m)``: elementwise
products, row/column sums and iota masks; no extra forward or backward pass.

Numerical guard (documented in the README): ``log|B|`` and ``log|F|`` are accumulated in log space
(no overflow of long products) and clipped to ``+-log(max)/8`` of the compute dtype (``+-11`` in
float32) before they
are exponentiated, so the step factors ``1/(B F)^2`` stay finite even for a 30-layer chain with
default initialization; the ratio ``R = v'_s / v_s`` of each skeleton-only path is clipped to
``[min_ratio, 1/min_ratio]`` (a skeleton path value never changes sign or collapses). A zero
skeleton weight counts as positive. Inside these bounds the allocation is exact.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gsgd_jax._tree import Path, leaves_with_paths
from gsgd_jax.structure import BasisPathStructure, Chain

__all__ = ["path_values", "path_gradients", "allocate", "compute_dtype"]


def compute_dtype(dtype) -> jnp.dtype:
  """The dtype G-space arithmetic runs in: at least float32 (bf16/f16 are promoted)."""
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
    taps = self.shape[:self.ntaps]
    if all(t == 1 for t in taps):
      return None
    shape = taps + (1, 1)
    out = None
    for ax, c in enumerate(self.center):
      if taps[ax] == 1:
        continue
      m = jax.lax.broadcasted_iota(jnp.int32, shape, ax) == c
      out = m if out is None else out & m
    return out


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
  parent: np.ndarray     # (out,) static: j mod in, row of j's incoming skeleton edge
  child: np.ndarray      # (in,) static: i mod out, column of i's outgoing skeleton edge
  first: bool
  last: bool
  work: _Work


def _where(mask, x, y):
  return y if mask is None else jnp.where(mask, x, y)


def _masks(chain: Chain, li: int) -> _Masks:
  layer = chain.layers[li]
  n_in, n_out = layer.in_dim, layer.out_dim
  work = _work(layer)
  parent = np.arange(n_out) % n_in
  child = np.arange(n_in) % n_out
  last = li == len(chain.layers) - 1
  first = li == 0
  rows = lambda: jax.lax.broadcasted_iota(jnp.int32, (n_in, n_out), 0)  # noqa: E731
  cols = lambda: jax.lax.broadcasted_iota(jnp.int32, (n_in, n_out), 1)  # noqa: E731
  # incoming skeleton edge of hidden node j: (j mod in, j); the diagonal when out <= in
  in_skel = None if last else (rows() == cols() if n_out <= n_in else rows() == parent[None, :])
  # outgoing skeleton edge of hidden node i: (i, i mod out); the diagonal when in <= out
  out_skel = None if first else (rows() == cols() if n_in <= n_out else cols() == child[:, None])
  if in_skel is None or out_skel is None:
    skeleton = out_skel if in_skel is None else in_skel
  elif n_in == n_out:
    skeleton = in_skel  # both are the diagonal
  else:
    skeleton = in_skel | out_skel
  # designated: incoming skeleton edges that are not also an outgoing one, (p, j) with
  # p mod out != j; statically empty unless this is the first layer or out > in.
  has_designated = not last and (first or bool(np.any(parent % n_out != np.arange(n_out))))
  designated = None
  if has_designated:
    designated = in_skel if out_skel is None else in_skel & ~out_skel
  center = work.center_mask()
  skeleton = None if skeleton is None else _and(center, skeleton)
  designated = None if designated is None else _and(center, designated)
  return _Masks(skeleton, designated, parent, child, first, last, work)


def _in_skeleton(kernel_center: jax.Array, m: _Masks) -> jax.Array:
  """``K[j mod in, j]`` for every column ``j``: the incoming skeleton entries (gather, O(h))."""
  return kernel_center[m.parent, np.arange(m.parent.shape[0])]


def _out_skeleton(kernel_center: jax.Array, m: _Masks) -> jax.Array:
  """``K[i, i mod out]`` for every row ``i``: the outgoing skeleton entries (gather, O(h))."""
  return kernel_center[np.arange(m.child.shape[0]), m.child]


def _materialize(vec: jax.Array) -> jax.Array:
  """Computes a per-node vector once instead of once per kernel entry.

  XLA:CPU otherwise fuses the O(h) vector arithmetic (ratios, clips, products of scales) into the
  O(m) elementwise pass over each kernel and re-evaluates it for every entry (about 30 instead of
  8 multiplies per weight). A reduction is never fused into its consumers, so a (trivial) sum over
  a leading axis of 2 pins the vector. Only on CPU: on accelerators each pinned vector would cost
  a kernel launch, which matters more there than the recomputation (unmeasured, see
  docs/performance.md).
  """
  if jax.default_backend() != "cpu":
    return vec
  return jnp.sum(jnp.stack([vec, jnp.zeros_like(vec)]), axis=0)


def _take_mod(vec: jax.Array, n: int) -> jax.Array:
  """``out[j] = vec[j % len(vec)]`` for ``j < n`` (tile + slice, no gather)."""
  k = vec.shape[0]
  if n == k:
    return vec
  return jnp.tile(vec, -(-n // k))[:n]


def _prefix(vec: jax.Array, n: int, fill: float) -> jax.Array:
  """``out[j] = vec[j]`` for ``j < min(n, len(vec))``, ``fill`` beyond."""
  k = vec.shape[0]
  if k >= n:
    return vec[:n]
  return jnp.concatenate([vec, jnp.full((n - k,), fill, vec.dtype)])


# ----------------------------------------------------------------------------------------------
# Skeleton products B and F, in log space
# ----------------------------------------------------------------------------------------------

class _Scales(NamedTuple):
  b: list[jax.Array]      # b[k]: B of node set k (signed, clipped); b[0] = 1
  inv_b: list[jax.Array]  # 1 / b[k]
  f: list[jax.Array]      # f[k]: F of node set k; f[L] = 1
  inv_f: list[jax.Array]


def _signed_exp(log_abs, sign, bound):
  lg = jnp.clip(log_abs, -bound, bound)
  return sign * jnp.exp(lg), sign * jnp.exp(-lg)


def _scales(chain: Chain, kernels: list[jax.Array], guard: bool = True) -> _Scales:
  """B and F for every node set of ``chain`` from its (T, in, out) kernels (compute dtype)."""
  L = len(chain.layers)
  dtype = kernels[0].dtype
  bound = float(np.log(np.finfo(dtype).max) / 8) if guard else np.inf
  h = chain.widths
  masks = [_masks(chain, li) for li in range(L)]
  centers = [k[m.work.center] for m, k in zip(masks, kernels)]

  def log_sign(w):
    return jnp.log(jnp.abs(w)), jnp.where(w < 0, -1.0, 1.0).astype(dtype)

  log_b = [jnp.zeros((h[0],), dtype)]
  sgn_b = [jnp.ones((h[0],), dtype)]
  for k in range(1, L):  # hidden node sets
    s_in = _in_skeleton(centers[k - 1], masks[k - 1])  # (h[k],)
    lw, sw = log_sign(s_in)
    log_b.append(_take_mod(log_b[k - 1], h[k]) + lw)
    sgn_b.append(_take_mod(sgn_b[k - 1], h[k]) * sw)

  log_f = [None] * (L + 1)
  sgn_f = [None] * (L + 1)
  log_f[L] = jnp.zeros((h[L],), dtype)
  sgn_f[L] = jnp.ones((h[L],), dtype)
  for k in range(L - 1, 0, -1):
    s_out = _out_skeleton(centers[k], masks[k])  # (h[k],)
    lw, sw = log_sign(s_out)
    log_f[k] = lw + _take_mod(log_f[k + 1], h[k])
    sgn_f[k] = sw * _take_mod(sgn_f[k + 1], h[k])
  log_f[0] = jnp.zeros((h[0],), dtype)  # unused: inputs are never the head of a path's F
  sgn_f[0] = jnp.ones((h[0],), dtype)

  bs = [_signed_exp(lb, sb, bound) for lb, sb in zip(log_b, sgn_b)]
  fs = [_signed_exp(lf, sf, bound) for lf, sf in zip(log_f, sgn_f)]
  bs.append((jnp.ones((h[L],), dtype),) * 2)  # B of outputs: unused
  return _Scales([x[0] for x in bs], [x[1] for x in bs], [x[0] for x in fs], [x[1] for x in fs])


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


def _rebuild(tree: Any, new: dict[Path, jax.Array], leaves: list[tuple[Path, Any]], treedef):
  out = [new[p].astype(jnp.asarray(x).dtype) if p in new else x for p, x in leaves]
  return jax.tree_util.tree_unflatten(treedef, out)


def _store(chain: Chain, out: dict, kernels: list, biases: list):
  for layer, k, b in zip(chain.layers, kernels, biases):
    out[layer.kernel] = k.reshape(layer.kernel_shape)
    if layer.bias is not None:
      out[layer.bias] = b


def _auto_axes(fn, like: Any):
  """``fn``, run with Auto mesh axes when ``like`` has leaves on a mesh with Explicit axes.

  The kernels index skeleton entries with gathers at static indices, which explicit sharding
  types reject on a split axis; inside ``auto_axes`` XLA partitions them, and the outputs get the
  shardings of ``like``'s leaves (the output tree has ``like``'s layout).
  """
  shardings = [getattr(jax.typeof(x), "sharding", None) for x in jax.tree.leaves(like)]
  if not any(isinstance(s, jax.sharding.NamedSharding)
             and jax.sharding.AxisType.Explicit in s.mesh.axis_types for s in shardings):
    return fn
  return jax.sharding.auto_axes(fn, out_sharding=jax.tree.map(lambda x: jax.typeof(x).sharding, like))


# ----------------------------------------------------------------------------------------------
# Path values
# ----------------------------------------------------------------------------------------------

def path_values(structure: BasisPathStructure, params: Any) -> Any:
  """Basis-path values laid out like ``params`` (see :func:`gsgd_jax.basis_path_values`)."""
  structure.check(params)
  return _auto_axes(functools.partial(_path_values_jit, structure), params)(params)


@functools.partial(jax.jit, static_argnums=0)
def _path_values_jit(structure: BasisPathStructure, params: Any) -> Any:
  leaves, treedef = leaves_with_paths(params)
  lookup = dict(leaves)
  new = {}
  for chain in structure.chains:
    dtype = _chain_dtype(chain, lookup)
    ks, bs = _chain_leaves(chain, lookup, dtype)
    sc = _scales(chain, ks, guard=False)
    out_k, out_b = [], []
    for li, (k, b) in enumerate(zip(ks, bs)):
      m = _masks(chain, li)
      v = k * m.work.row(sc.b[li]) * m.work.col(sc.f[li + 1])
      # Skeleton-only path of a class-first node j: B(j) F(j), stored at its designated edge.
      vs = m.work.col(sc.b[li + 1] * sc.f[li + 1]) if li < len(ks) - 1 else 0.0
      v = _where(m.skeleton, _where(m.designated, vs, 0.0), v)
      out_k.append(v)
      out_b.append(None if b is None else b * sc.f[li + 1])
    _store(chain, new, out_k, out_b)
  return _rebuild(params, new, leaves, treedef)


# ----------------------------------------------------------------------------------------------
# Inverse chain rule: dL/dw -> dL/dv
# ----------------------------------------------------------------------------------------------

def _chain_path_gradients(chain: Chain, ks, bs, gks, gbs, weight_decay):
  L = len(chain.layers)
  h = chain.widths
  sc = _scales(chain, ks)
  masks = [_masks(chain, li) for li in range(L)]

  # BK[k](u): sum of x over basis paths whose back chain passes through hidden node u and whose
  # own edge lies after u (non-skeleton edges leaving u's subtree of incoming skeleton edges, and
  # the skeleton-only paths starting in that subtree). Deepest first.
  bk = [None] * (L + 1)
  for k in range(L - 1, 0, -1):
    # all edges leaving u except its outgoing skeleton edge
    c = masks[k].work.center
    rows = (masks[k].work.row_sum(ks[k] * gks[k])
            - _out_skeleton(ks[k][c], masks[k]) * _out_skeleton(gks[k][c], masks[k]))
    if k + 1 <= L - 1:
      rows = rows + _prefix(bk[k + 1], h[k], 0.0)
    bk[k] = rows

  out_k, out_b = [], []
  for li in range(L):
    m = masks[li]
    inv_bf = m.work.row(_materialize(sc.inv_b[li])) * m.work.col(_materialize(sc.inv_f[li + 1]))
    pg = gks[li] * inv_bf  # dL/dv_e = g_e / (B(i) F(j))
    if weight_decay is not None:
      v = ks[li] * m.work.row(sc.b[li]) * m.work.col(sc.f[li + 1])
      pg = pg + weight_decay * v
    if li < L - 1:
      k = li + 1
      c = m.work.center
      x_in = _in_skeleton(ks[li][c], m) * _in_skeleton(gks[li][c], m)
      y = x_in - bk[k]  # v_s dL/dv_s of the skeleton-only path of class-first node j
      ds = m.work.col(_materialize(y * sc.inv_b[k] * sc.inv_f[k]))  # dL/dv_s = y / v_s
      pg = _where(m.skeleton, _where(m.designated, ds, 0.0), pg)
    else:
      pg = _where(m.skeleton, 0.0, pg)
    out_k.append(pg)
    if bs[li] is None:
      out_b.append(None)
    else:
      pb = gbs[li] * sc.inv_f[li + 1]
      if weight_decay is not None:
        pb = pb + weight_decay * bs[li] * sc.f[li + 1]
      out_b.append(pb)
  return out_k, out_b


def path_gradients(structure: BasisPathStructure, params: Any, grads: Any,
                   weight_decay: Any = None) -> Any:
  """The inverse chain rule: ``dL/dv`` for every basis path, laid out like ``params``.

  Non-skeleton edge ``e = (i -> j)``: ``dL/dv_e = g_e / (B(i) F(j))``; bias: ``g_b / F(j)``;
  skeleton-only path ``s`` (stored at its designated edge): ``dL/dv_s = y_s / v_s`` where
  ``y_s = x_r - (sum of x over the other basis paths through r)`` for its designated edge ``r``,
  ``x = w * g``. Other skeleton positions hold 0. Leaves outside G-space get ``g`` (plus
  ``weight_decay * w``): the fallback sees ordinary weight gradients.

  Args:
    structure: the basis-path structure.
    params: current params ``w``.
    grads: ``dL/dw`` laid out like ``params``.
    weight_decay: optional L2 coefficient on the non-skeleton basis-path values (and on the
      fallback leaves).
  """
  structure.check(params)
  return _auto_axes(functools.partial(_path_gradients_jit, structure), grads)(
      params, grads, weight_decay)


@functools.partial(jax.jit, static_argnums=0)
def _path_gradients_jit(structure, params, grads, weight_decay):
  leaves, treedef = leaves_with_paths(grads)
  g_lookup = dict(leaves)
  p_lookup = dict(leaves_with_paths(params)[0])
  new = {}
  for chain in structure.chains:
    dtype = _chain_dtype(chain, p_lookup)
    ks, bs = _chain_leaves(chain, p_lookup, dtype)
    gks, gbs = _chain_leaves(chain, g_lookup, dtype)
    wd = None if weight_decay is None else jnp.asarray(weight_decay, dtype)
    out_k, out_b = _chain_path_gradients(chain, ks, bs, gks, gbs, wd)
    _store(chain, new, out_k, out_b)
  if weight_decay is not None:
    for p, g in leaves:
      if p not in new:
        new[p] = g + weight_decay * p_lookup[p]
  return _rebuild(grads, new, leaves, treedef)


# ----------------------------------------------------------------------------------------------
# Weight allocation: path-space update -> exact weight update
# ----------------------------------------------------------------------------------------------

def _chain_allocate(chain: Chain, ks, bs, dks, dbs, min_ratio):
  L = len(chain.layers)
  h = chain.widths
  sc = _scales(chain, ks)
  masks = [_masks(chain, li) for li in range(L)]
  dtype = ks[0].dtype

  # R[k](j) = v'_s / v_s of the skeleton-only path through hidden node j, carried along a class.
  ratios = [jnp.ones((h[0],), dtype)]
  for k in range(1, L):
    m = masks[k - 1]
    dv = _in_skeleton(dks[k - 1][m.work.center], m)  # at designated columns
    r_new = 1.0 + dv * sc.inv_b[k] * sc.inv_f[k]
    if min_ratio is not None:
      r_new = jnp.clip(r_new, min_ratio, 1.0 / min_ratio)
    if k == 1:
      r = r_new
    else:
      first = jnp.arange(h[k]) >= h[k - 1]  # class-first nodes
      r = jnp.where(first, r_new, _prefix(ratios[k - 1], h[k], 1.0))
    ratios.append(r)
  ratios.append(jnp.ones((h[L],), dtype))

  out_k, out_b = [], []
  for li in range(L):
    m = masks[li]
    w = ks[li]
    inv_f = m.work.col(_materialize(sc.inv_f[li + 1]))
    # w' = (v + dv) / (B'(i) F(j)) with B'(i) = B(i) R(i), F' = F:
    #   dw = w (1/R(i) - 1) + dv / (B(i) F(j) R(i))
    if li == 0:
      dw = dks[li] * (m.work.row(_materialize(sc.inv_b[li])) * inv_f)
    else:
      inv_r = 1.0 / ratios[li]
      shrink = m.work.row(_materialize(inv_r - 1.0))
      row = m.work.row(_materialize(sc.inv_b[li] * inv_r))
      dw = w * shrink + dks[li] * (row * inv_f)
    if li < L - 1:
      # designated skeleton edge (p -> j): w' = w R(j) / R(p); other skeleton edges fixed.
      des = w * (m.work.col(_materialize(ratios[li + 1]))
                 * m.work.row(_materialize(1.0 / ratios[li])) - 1.0)
      dw = _where(m.skeleton, _where(m.designated, des, 0.0), dw)
    else:
      dw = _where(m.skeleton, 0.0, dw)
    out_k.append(dw)
    out_b.append(None if bs[li] is None else dbs[li] * sc.inv_f[li + 1])
  return out_k, out_b


def allocate(structure: BasisPathStructure, params: Any, path_updates: Any,
             min_ratio: float | None = 1e-1) -> Any:
  """Weight allocation: the weight update that moves every basis-path value by ``path_updates``.

  Skeleton weights outside the first layer of each skeleton-only path stay fixed; the designated
  edge of each skeleton-only path ``s`` absorbs ``R_s = (v_s + dv_s) / v_s``; every other weight
  is solved from its new path value: ``w' = (w + dv / (B F)) / R(i)``. After ``w + update`` the
  basis-path values are exactly ``v + dv`` (inside the guard: ``R`` clipped to
  ``[min_ratio, 1 / min_ratio]``; ``min_ratio=None`` disables the clip).

  Leaves outside G-space pass through unchanged (they already hold weight updates).
  """
  structure.check(params)
  return _auto_axes(functools.partial(_allocate_jit, structure, min_ratio), path_updates)(
      params, path_updates)


@functools.partial(jax.jit, static_argnums=0)
def _allocate_jit(structure, min_ratio, params, path_updates):
  leaves, treedef = leaves_with_paths(path_updates)
  d_lookup = dict(leaves)
  p_lookup = dict(leaves_with_paths(params)[0])
  new = {}
  for chain in structure.chains:
    dtype = _chain_dtype(chain, p_lookup)
    ks, bs = _chain_leaves(chain, p_lookup, dtype)
    dks, dbs = _chain_leaves(chain, d_lookup, dtype)
    out_k, out_b = _chain_allocate(chain, ks, bs, dks, dbs, min_ratio)
    _store(chain, new, out_k, out_b)
  return _rebuild(path_updates, new, leaves, treedef)
