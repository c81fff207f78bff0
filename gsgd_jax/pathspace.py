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
  return _Masks(skeleton, designated, parent, child, work)


def _in_skeleton(kernel_center, parent: np.ndarray):
  """``K[j mod in, j]`` for every column ``j`` (``parent = _Masks.parent``): the incoming
  skeleton entries (gather, O(h); numpy or JAX).

  A gather (rather than strided slices of the diagonal blocks) lets XLA compute a kernel-sized
  producer only at these entries, and measured faster on CPU.
  """
  return kernel_center[parent, np.arange(parent.shape[0])]


def _out_skeleton(kernel_center, child: np.ndarray):
  """``K[i, i mod out]`` for every row ``i`` (``child = _Masks.child``): the outgoing skeleton
  entries (gather, O(h); numpy or JAX)."""
  return kernel_center[np.arange(child.shape[0]), child]


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

  def hidden(self, c: int, k: int) -> slice:
    return slice(self.offsets[c][k], self.offsets[c][k] + self.widths[c][k])


@functools.lru_cache(maxsize=None)
def _plan(widths: tuple[tuple[int, ...], ...]) -> _Plan:
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
  return _Plan(tuple(widths), tuple(all_offsets), n, parent, child, nxt, tuple(heads), first)


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


class _Scales(NamedTuple):
  """``B`` and ``F`` of every hidden node (flat, signed, clipped) and their inverses."""
  plan: _Plan
  b: jax.Array | None
  inv_b: jax.Array | None
  f: jax.Array | None
  inv_f: jax.Array | None

  def at(self, vec: jax.Array | None, c: int, k: int) -> jax.Array | None:
    """The entries of flat ``vec`` for node set ``k`` of chain ``c``; ``None`` (meaning 1) for
    the chain's inputs and outputs."""
    if vec is None or k == 0 or k == len(self.plan.widths[c]) - 1:
      return None
    return vec[self.plan.hidden(c, k)]


def _mul(*xs):
  """Product of the given factors, skipping ``None`` (= 1); ``None`` if all are."""
  out = None
  for x in xs:
    if x is not None:
      out = x if out is None else out * x
  return out


def _scales(chains, masks, kernels, guard: bool = True) -> _Scales:
  """B and F for every hidden node of ``chains`` (one flat vector) from their kernels (lists per
  chain, in the compute dtype)."""
  plan = _plan(tuple(chain.widths for chain in chains))
  if plan.size == 0:
    return _Scales(plan, None, None, None, None)
  dtype = kernels[0][0].dtype
  bound = float(np.log(np.finfo(dtype).max) / 8) if guard else np.inf
  s_in, s_out = [], []
  for ms, ks in zip(masks, kernels):
    centers = [k[m.work.center] for m, k in zip(ms, ks)]
    s_in += [_in_skeleton(centers[k - 1], ms[k - 1].parent) for k in range(1, len(ks))]
    s_out += [_out_skeleton(centers[k], ms[k].child) for k in range(1, len(ks))]
  s_in, s_out = _flat(s_in), _flat(s_out)

  def signed_exp(s, ptr):
    # log|product| and the number of negative factors, summed along the chain together
    lg, neg = _chain_sum(jnp.stack([jnp.log(jnp.abs(s)), (s < 0).astype(dtype)]), ptr)
    sign = 1.0 - 2.0 * jnp.mod(neg, 2.0)
    lg = jnp.clip(lg, -bound, bound)
    return sign * jnp.exp(lg), sign * jnp.exp(-lg)

  b, inv_b = signed_exp(s_in, plan.parent)
  f, inv_f = signed_exp(s_out, plan.child)
  return _Scales(plan, b, inv_b, f, inv_f)


def smallest_skeleton_path(structure: BasisPathStructure, params: Any
                           ) -> tuple[float, Path | None]:
  """The smallest ``|v_s| = B(u) F(u)`` over skeleton-only paths (``u`` a class head) and the
  kernel that stores it. Host-side numpy in float64 on the O(h) skeleton entries: no
  compilation, for checks at ``tx.init``."""
  leaves = dict(leaves_with_paths(params)[0])
  smallest, where = np.inf, None
  for chain in structure.chains:
    plan = _plan((chain.widths,))
    if not plan.size:
      continue
    centers = []
    for layer in chain.layers:
      work = _work(layer)
      centers.append(np.abs(np.asarray(leaves[layer.kernel], np.float64).reshape(work.shape)[
          work.center]))
    h = chain.widths
    idx = lambda n, m: np.arange(n) % m  # noqa: E731  (parent / child indices)
    s_in = np.concatenate([_in_skeleton(centers[k - 1], idx(h[k], h[k - 1]))
                           for k in range(1, len(centers))])
    s_out = np.concatenate([_out_skeleton(centers[k], idx(h[k], h[k + 1]))
                            for k in range(1, len(centers))])
    log_v = _chain_sum(np.log(s_in), plan.parent) + _chain_sum(np.log(s_out), plan.child)
    for _, k, lo in plan.heads:
      start = plan.offsets[0][k]
      m = float(np.exp(np.min(log_v[start + lo:start + h[k]])))
      if m < smallest:
        smallest, where = m, chain.layers[k - 1].kernel
  return smallest, where


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
  for chains, masks, (kb,) in _groups(structure, lookup):
    sc = _scales(chains, masks, [k for k, _ in kb], guard=False)
    for c, (chain, (ks, bs)) in enumerate(zip(chains, kb)):
      out_k, out_b = [], []
      for li, (k, b) in enumerate(zip(ks, bs)):
        m = masks[c][li]
        f_out = sc.at(sc.f, c, li + 1)
        v = _mul(k, _row(m, sc.at(sc.b, c, li)), _col(m, f_out))
        # Skeleton-only path of a class-first node j: B(j) F(j), stored at its designated edge.
        vs = _col(m, sc.at(sc.b, c, li + 1) * f_out) if li < len(ks) - 1 else 0.0
        v = _where(m.skeleton, _where(m.designated, vs, 0.0), v)
        out_k.append(v)
        out_b.append(None if b is None else _mul(b, f_out))
      _store(chain, new, out_k, out_b)
  return _rebuild(params, new, leaves, treedef)


# ----------------------------------------------------------------------------------------------
# Inverse chain rule: dL/dw -> dL/dv
# ----------------------------------------------------------------------------------------------

def _row(m: _Masks, vec):
  return None if vec is None else m.work.row(vec)


def _col(m: _Masks, vec):
  return None if vec is None else m.work.col(vec)


def _pin(*vecs):
  """:func:`_materialize` for the non-``None`` vectors (in one reduction); ``None`` stays."""
  real = [v for v in vecs if v is not None]
  if not real:
    return vecs if len(vecs) > 1 else None
  pinned = _materialize(*real)
  pinned = iter(pinned if len(real) > 1 else (pinned,))
  out = tuple(None if v is None else next(pinned) for v in vecs)
  return out if len(vecs) > 1 else out[0]


def _group_path_gradients(chains, masks, p_leaves, g_leaves, weight_decay):
  """``dL/dv`` for the kernels and biases of ``chains``: a list per chain of ``(kernels, biases)``."""
  sc = _scales(chains, masks, [k for k, _ in p_leaves])
  plan = sc.plan

  ds = None
  if plan.size:
    # BK(u): sum of x = w * g over the basis paths whose back chain passes through hidden node u
    # and whose own edge lies after u: every edge leaving u except its outgoing skeleton edge,
    # plus BK of the next node of u's skeleton class (a sum along the static `next` chain).
    rows, x_in = [], []
    for ms, (ks, _), (gks, _) in zip(masks, p_leaves, g_leaves):
      for k in range(1, len(ks)):
        mk, mp = ms[k], ms[k - 1]
        ck, cp = mk.work.center, mp.work.center
        # (the row sum reads w and g once; the skeleton entry is subtracted from O(h) gathers,
        # as masking it inside the reduction measured slower on CPU)
        rows.append(mk.work.row_sum(ks[k] * gks[k])
                    - _out_skeleton(ks[k][ck], mk.child) * _out_skeleton(gks[k][ck], mk.child))
        x_in.append(_in_skeleton(ks[k - 1][cp], mp.parent)
                    * _in_skeleton(gks[k - 1][cp], mp.parent))
    bk = _chain_sum(_flat(rows), plan.next)
    # v_s dL/dv_s of the skeleton-only path of each class-first node u, then dL/dv_s = y / v_s.
    ds = (_flat(x_in) - bk) * sc.inv_b * sc.inv_f
  # Pinned in groups of equal dependencies: B and F need only the params, ds all row sums.
  ds = _pin(ds)
  inv_b, inv_f = _pin(sc.inv_b, sc.inv_f)

  out = []
  for c, (ms, (ks, bs), (gks, gbs)) in enumerate(zip(masks, p_leaves, g_leaves)):
    L = len(ks)
    out_k, out_b = [], []
    for li in range(L):
      m = ms[li]
      f_out = sc.at(inv_f, c, li + 1)
      pg = _mul(gks[li], _row(m, sc.at(inv_b, c, li)), _col(m, f_out))  # g_e / (B(i) F(j))
      if weight_decay is not None:
        v = _mul(ks[li], _row(m, sc.at(sc.b, c, li)), _col(m, sc.at(sc.f, c, li + 1)))
        pg = pg + weight_decay * v
      if li < L - 1:
        pg = _where(m.skeleton, _where(m.designated, _col(m, sc.at(ds, c, li + 1)), 0.0), pg)
      else:
        pg = _where(m.skeleton, 0.0, pg)
      out_k.append(pg)
      if bs[li] is None:
        out_b.append(None)
      else:
        pb = _mul(gbs[li], f_out)
        if weight_decay is not None:
          pb = pb + weight_decay * _mul(bs[li], sc.at(sc.f, c, li + 1))
        out_b.append(pb)
    out.append((out_k, out_b))
  return out


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
  for chains, masks, (p_leaves, g_leaves) in _groups(structure, p_lookup, g_lookup):
    dtype = p_leaves[0][0][0].dtype
    wd = None if weight_decay is None else jnp.asarray(weight_decay, dtype)
    for chain, (out_k, out_b) in zip(chains, _group_path_gradients(chains, masks, p_leaves,
                                                                   g_leaves, wd)):
      _store(chain, new, out_k, out_b)
  if weight_decay is not None:
    for p, g in leaves:
      if p not in new:
        new[p] = g + weight_decay * p_lookup[p]
  return _rebuild(grads, new, leaves, treedef)


# ----------------------------------------------------------------------------------------------
# Weight allocation: path-space update -> exact weight update
# ----------------------------------------------------------------------------------------------

def _group_allocate(chains, masks, p_leaves, d_leaves, min_ratio):
  """Weight updates for the kernels and biases of ``chains``, a list per chain of ``(kernels,
  biases)``, from their path-space updates."""
  sc = _scales(chains, masks, [k for k, _ in p_leaves])
  plan = sc.plan

  ratio = inv_r = shrink = row = None
  if plan.size:
    # R(u) = v'_s / v_s of the skeleton-only path of u's class. Only class heads get a new
    # ratio, from dv_s stored at their (designated) incoming skeleton edge, so XLA computes the
    # path-space update at those O(h) entries only; every other node reads its head's.
    scale = sc.inv_b * sc.inv_f
    r_heads = []
    for c, k, lo in plan.heads:
      m = masks[c][k - 1]
      hk = plan.widths[c][k]
      dv = d_leaves[c][0][k - 1][m.work.center][m.parent[lo:], np.arange(lo, hk)]
      r_heads.append(1.0 + dv * scale[plan.offsets[c][k] + lo:plan.offsets[c][k] + hk])
    r_new = _flat(r_heads)
    if min_ratio is not None:
      r_new = jnp.clip(r_new, min_ratio, 1.0 / min_ratio)
    r = r_new[plan.first]
    ratio, inv_r, shrink, row = _pin(r, 1.0 / r, 1.0 / r - 1.0, sc.inv_b / r)
  inv_b, inv_f = _pin(sc.inv_b, sc.inv_f)

  out = []
  for c, (ms, (ks, bs), (dks, dbs)) in enumerate(zip(masks, p_leaves, d_leaves)):
    L = len(ks)
    out_k, out_b = [], []
    for li in range(L):
      m = ms[li]
      w = ks[li]
      col = _col(m, sc.at(inv_f, c, li + 1))
      # w' = (v + dv) / (B'(i) F(j)) with B'(i) = B(i) R(i), F' = F:
      #   dw = w (1/R(i) - 1) + dv / (B(i) F(j) R(i))
      if li == 0:
        dw = _mul(dks[li], col)
      else:
        dw = w * _row(m, sc.at(shrink, c, li)) + _mul(dks[li], _row(m, sc.at(row, c, li)), col)
      if li < L - 1:
        # designated skeleton edge (p -> j): w' = w R(j) / R(p); other skeleton edges fixed.
        des = w * (_mul(_col(m, sc.at(ratio, c, li + 1)), _row(m, sc.at(inv_r, c, li))) - 1.0)
        dw = _where(m.skeleton, _where(m.designated, des, 0.0), dw)
      else:
        dw = _where(m.skeleton, 0.0, dw)
      out_k.append(dw)
      out_b.append(None if bs[li] is None else _mul(dbs[li], sc.at(inv_f, c, li + 1)))
    out.append((out_k, out_b))
  return out


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
  for chains, masks, (p_leaves, d_leaves) in _groups(structure, p_lookup, d_lookup):
    for chain, (out_k, out_b) in zip(chains, _group_allocate(chains, masks, p_leaves, d_leaves,
                                                             min_ratio)):
      _store(chain, new, out_k, out_b)
  return _rebuild(path_updates, new, leaves, treedef)
