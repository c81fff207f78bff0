"""G-space arithmetic: path values, the inverse chain rule, and the exact weight allocation.

Notation (``docs/method.md``): node sets ``k = 0..L`` of a chain (``0`` inputs, ``L``
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
from gsgd_jax.structure import BasisPathStructure, Chain, SkeletonIndex, skeleton_index

__all__ = ["basis_path_values", "path_values", "path_gradients", "allocate", "path_scales", "compute_dtype"]



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
  idx: SkeletonIndex     # static skeleton indices (rows/columns by position and by unit)
  work: _Work

  def in_skeleton(self, kernel_center):
    """Incoming skeleton entries of the out set, in skeleton-position order (gather, O(h))."""
    return kernel_center[self.idx.in_rows, self.idx.in_cols]

  def out_skeleton(self, kernel_center):
    """Outgoing skeleton entries of the in set, in skeleton-position order (gather, O(h))."""
    return kernel_center[self.idx.out_rows, self.idx.out_cols]

  def by_position(self, row_vec):
    """A per-in-unit vector (e.g. a row sum) in skeleton-position order of the in set."""
    return row_vec if self.idx.identity else row_vec[self.idx.out_rows]


def _where(mask, x, y):
  return y if mask is None else jnp.where(mask, x, y)


def _masks(chain: Chain, li: int) -> _Masks:
  layer = chain.layers[li]
  n_in, n_out = layer.in_dim, layer.out_dim
  work = _work(layer)
  idx = skeleton_index(chain, li)
  parent = np.arange(n_out) % n_in  # in skeleton positions
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
  return _Masks(skeleton, designated, idx, work)


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


class _Scales(NamedTuple):
  """``B`` and ``F`` of every hidden node (flat, signed, clipped) and their inverses."""
  plan: _Plan
  b: jax.Array | None
  inv_b: jax.Array | None
  f: jax.Array | None
  inv_f: jax.Array | None
  log_rho: jax.Array | None  # log|B F|: log of the skeleton path through each node (invariant)
  class_fanout: np.ndarray | None  # static: non-skeleton kernel entries leaving u's class from u on

  def at(self, vec: jax.Array | None, c: int, k: int) -> jax.Array | None:
    """The entries of flat ``vec`` for node set ``k`` of chain ``c``, in unit order (to
    broadcast over kernels); ``None`` (meaning 1) for the chain's inputs and outputs."""
    if vec is None or k == 0 or k == len(self.plan.widths[c]) - 1:
      return None
    return self.plan.by_unit(vec, c, k)


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
  plan = _plan_of(chains)
  if plan.size == 0:
    return _Scales(plan, None, None, None, None, None, None)
  dtype = kernels[0][0].dtype
  bound = float(np.log(np.finfo(dtype).max) / 8) if guard else np.inf
  s_in, s_out = [], []
  for chain, ms, ks in zip(chains, masks, kernels):
    a, b = _skeleton_entries(chain, [k[m.work.center] for m, k in zip(ms, ks)], jnp)
    s_in.append(a)
    s_out.append(b)
  s_in, s_out = _flat(s_in), _flat(s_out)

  def signed_exp(s, ptr):
    # log|product| and the number of negative factors, summed along the chain together
    lg, neg = _chain_sum(jnp.stack([jnp.log(jnp.abs(s)), (s < 0).astype(dtype)]), ptr)
    sign = 1.0 - 2.0 * jnp.mod(neg, 2.0)
    lg = jnp.clip(lg, -bound, bound)
    return sign * jnp.exp(lg), sign * jnp.exp(-lg), lg

  b, inv_b, lg_b = signed_exp(s_in, plan.parent)
  f, inv_f, lg_f = signed_exp(s_out, plan.child)
  return _Scales(plan, b, inv_b, f, inv_f, lg_b + lg_f, _class_fanout(chains, plan))


def _class_fanout(chains, plan: _Plan) -> np.ndarray:
  """For every hidden node ``u`` (flat, position order): the number of non-skeleton kernel
  entries leaving ``u`` and the later nodes of its skeleton class (static). At a class head it
  counts the edges whose paths the skeleton-only path's coordinate rescales."""
  vals = np.zeros(plan.size)
  for c, chain in enumerate(chains):
    h = chain.widths
    for k in range(1, len(h) - 1):
      vals[plan.hidden(c, k)] = chain.layers[k].num_taps * h[k + 1] - 1
  return np.maximum(_chain_sum(vals, plan.next), 1.0)


class _Sigma(NamedTuple):
  """Per-path scale ``sigma`` of the coordinates ``u = v / sigma`` for one layer of one chain:
  ``const * row[i] * col[j]`` at a non-skeleton entry ``(i, j)``, ``const * col[j]`` at a bias,
  ``const * head[j]`` at a designated edge (skeleton-only path). ``None`` means 1."""
  const: Any
  row: jax.Array | None
  col: jax.Array | None
  head: jax.Array | None


def _off(balance) -> bool:
  """Statically no per-path scales (``balance`` is a Python 0); a traced value is never off."""
  return isinstance(balance, (int, float)) and not balance


def _split_balance(balance):
  """``(static, traced)``: a Python number is a static jit argument (so ``0`` compiles the plain
  update); anything else (an ``inject_hyperparams`` value) is traced."""
  if isinstance(balance, (int, float)) and not isinstance(balance, bool):
    return float(balance), None
  return None, balance


def _sigma(sc: _Scales, c: int, li: int, L: int, s, balance, fanout: float = 1.0) -> _Sigma:
  """``sigma`` for layer ``li`` of chain ``c`` (``s``: the chain's global scale, or None).

  ``balance = 0``: ``sigma = s`` for every path. ``balance = b > 0``: ``sigma = s^(1-b)
  sigma_bal^b`` with ``sigma_bal`` the product of the path's skeleton weights in a balanced gauge,
  where each skeleton weight of the path through node ``u`` has magnitude ``rho(u)^(1/L)``
  (``rho(u) = |B(u) F(u)|``, the skeleton path through ``u``): a non-skeleton edge in layer ``l``
  (1-based) carries ``l - 1`` of them before it and ``L - l`` after it. A skeleton-only path
  headed by ``u`` also gets ``1 / n_u``, ``n_u`` the (static) number of non-skeleton kernel
  entries leaving its class (``docs/method.md``).
  """
  if _off(balance) or sc.log_rho is None:
    return _Sigma(s, None, None, None)
  full = isinstance(balance, (int, float)) and balance == 1  # s^0: statically 1
  const = None if s is None or full else s ** (1.0 - balance)
  lr_in = sc.at(sc.log_rho, c, li)
  lr_out = sc.at(sc.log_rho, c, li + 1)
  row = None if lr_in is None else jnp.exp((balance * li / L) * lr_in)
  col = None if lr_out is None else jnp.exp((balance * (L - 1 - li) / L) * lr_out)
  head = None if lr_out is None else jnp.exp(
      balance * ((L - 1) / L * lr_out - fanout * np.log(sc.at(sc.class_fanout, c, li + 1))))
  return _Sigma(const, row, col, head)


def _inv(x):
  return None if x is None else 1.0 / x


def _skeleton_entries(chain: Chain, centers, xp):
  """``(s_in, s_out)``: the incoming and the outgoing skeleton weight of every hidden node of
  ``chain`` (flat, skeleton-position order; O(h) gathers) from the kernels' centre taps
  ``(in, out)``; ``xp``: numpy or jax.numpy."""
  idx = [skeleton_index(chain, li) for li in range(len(centers))]
  s_in = [centers[k - 1][idx[k - 1].in_rows, idx[k - 1].in_cols] for k in range(1, len(centers))]
  s_out = [centers[k][idx[k].out_rows, idx[k].out_cols] for k in range(1, len(centers))]
  return xp.concatenate(s_in), xp.concatenate(s_out)


def _log_b_plus_f(chain: Chain, centers, log, xp, plan: _Plan):
  """``log|B(u)| + log|F(u)|`` of every hidden node ``u`` of ``chain`` (flat, skeleton-position
  order) from the kernels' centre taps; ``xp``: numpy or jax.numpy."""
  s_in, s_out = _skeleton_entries(chain, centers, xp)
  return _chain_sum(log(xp.abs(s_in)), plan.parent) + _chain_sum(log(xp.abs(s_out)), plan.child)


def path_scales(structure: BasisPathStructure, params: Any) -> jax.Array:
  """The path-coordinate scale ``s`` of every chain, ``(num_chains,)``, from the params.

  ``s = tau^(L-1)`` with ``tau`` the geometric mean over the chain's skeleton-only paths of
  ``|v_s|^(1/L)`` (``L`` layers): in a gauge where every skeleton weight has magnitude ``tau`` (a
  *balanced* gauge), the basis path of a non-skeleton weight carries ``L - 1`` skeleton weights,
  so ``B F = tau^(L-1) = s`` for every one of them. G-space optimizers that work in the
  coordinates ``u = v / s`` (``normalize=True`` of :func:`gsgd_jax.g_space`) then move
  non-skeleton weights like their weight-space counterpart does in that gauge, and a learning
  rate has the magnitude it has for SGD or Adam. ``s`` depends on skeleton-only path values
  only, so it is invariant under positive rescaling; ``s = 1`` when every skeleton weight is 1 (the
  reference initialization). Chains of one layer have no skeleton: ``s = 1``. Jit-able.

  Args:
    structure: the basis-path structure.
    params: the params (concrete or traced).

  Returns:
    A ``(num_chains,)`` array of positive scales, ordered like ``structure.chains``.
  """
  structure.check(params)
  fn = functools.partial(_path_scales_jit, structure)
  mesh = _explicit_mesh(params)
  if mesh is not None:  # gathers at static indices need Auto axes; the result is replicated
    fn = jax.sharding.auto_axes(fn, out_sharding=jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec()))
  return fn(params)


@functools.partial(jax.jit, static_argnums=0)
def _path_scales_jit(structure: BasisPathStructure, params: Any) -> jax.Array:
  leaves = dict(leaves_with_paths(params)[0])
  out = []
  for chain in structure.chains:
    L = len(chain.layers)
    plan = _plan_of((chain,))
    dtype = _chain_dtype(chain, leaves)
    if not plan.size:
      out.append(jnp.ones((), dtype))
      continue
    ks, _ = _chain_leaves(chain, leaves, dtype)
    centers = [k[_work(layer).center] for k, layer in zip(ks, chain.layers)]
    log_v = _log_b_plus_f(chain, centers, jnp.log, jnp, plan)
    heads = np.concatenate([np.arange(plan.offsets[0][k] + lo, plan.offsets[0][k] + plan.widths[0][k])
                            for _, k, lo in plan.heads])
    out.append(jnp.exp(jnp.mean(log_v[heads]) * (L - 1) / L))
  return jnp.stack(out) if out else jnp.ones((0,), jnp.float32)


def _chain_scales(structure: BasisPathStructure, chains, scale, dtype):
  """Per-chain scalars of ``scale`` (indexed like ``structure.chains``) for ``chains``, or Nones."""
  if scale is None:
    return [None] * len(chains)
  scale = jnp.asarray(scale, dtype)
  return [scale[structure.chains.index(c)] for c in chains]


def smallest_skeleton_path(structure: BasisPathStructure, params: Any
                           ) -> tuple[float, Path | None]:
  """The smallest ``|v_s| = B(u) F(u)`` over skeleton-only paths (``u`` a class head) and the
  kernel that stores it. Host-side numpy in float64 on the O(h) skeleton entries: no
  compilation, for checks at ``tx.init``.

  Args:
    structure: the basis-path structure.
    params: concrete params.

  Returns:
    ``(smallest value, canonical path of the kernel storing it)``; ``(inf, None)`` when no chain
    has a skeleton.
  """
  leaves = dict(leaves_with_paths(params)[0])
  smallest, where = np.inf, None
  for chain in structure.chains:
    plan = _plan_of((chain,))
    if not plan.size:
      continue
    centers = []
    for layer in chain.layers:
      work = _work(layer)
      centers.append(np.abs(np.asarray(leaves[layer.kernel], np.float64).reshape(work.shape)[
          work.center]))
    h = chain.widths
    with np.errstate(divide="ignore"):
      log_v = _log_b_plus_f(chain, centers, np.log, np, plan)
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


# ----------------------------------------------------------------------------------------------
# Path values
# ----------------------------------------------------------------------------------------------

def basis_path_values(structure: BasisPathStructure, params: Any) -> Any:
  """Basis-path values laid out like ``params``.

  A non-skeleton weight holds ``v_e = B(i) w_e F(j)``, a bias ``v_b = b F(j)``, the designated
  skeleton edge of each skeleton-only path holds that path's value, other skeleton weights hold 0.
  Leaves outside G-space are returned unchanged. Computed in float64 when x64 is enabled, else in
  float32 (plain products, no guards: this is the inspection view).

  Args:
    structure: the basis-path structure.
    params: the params (concrete or traced).

  Returns:
    A tree like ``params`` holding basis-path values at the G-space leaves.
  """
  structure.check(params)
  return _auto_axes(functools.partial(_path_values_jit, structure), params)(params)


path_values = basis_path_values  # the name used inside the library and tests


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


def _group_path_gradients(chains, masks, p_leaves, g_leaves, weight_decay, scales,
                          balance=0.0, bn_scaling=None, fanout=1.0):
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
        rows.append(mk.by_position(mk.work.row_sum(ks[k] * gks[k]))
                    - mk.out_skeleton(ks[k][ck]) * mk.out_skeleton(gks[k][ck]))
        x_in.append(mp.in_skeleton(ks[k - 1][cp]) * mp.in_skeleton(gks[k - 1][cp]))
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
      # gradients in the coordinates u = v / sigma: sigma dL/dv (+ weight_decay * u)
      sg = _sigma(sc, c, li, L, scales[c], balance, fanout)
      wd = None if weight_decay is None else _mul(weight_decay, _inv(sg.const))
      m = ms[li]
      f_out = sc.at(inv_f, c, li + 1)
      # sigma g_e / (B(i) F(j))
      pg = _mul(gks[li], _row(m, _mul(sc.at(inv_b, c, li), sg.row)), _col(m, _mul(f_out, sg.col)),
                sg.const)
      wd_v = None
      if wd is not None:
        v = _mul(ks[li], _row(m, _mul(sc.at(sc.b, c, li), _inv(sg.row))),
                 _col(m, _mul(sc.at(sc.f, c, li + 1), _inv(sg.col))))
        wd_v = wd * v
      # The reference code's BatchNorm heuristic scales gradients, not the weight decay.
      bn = bn_scaling == "weight" and chains[c].layers[li].normalized
      if wd_v is not None and not bn:
        pg = pg + wd_v
      if li < L - 1:
        pg = _where(m.skeleton, _where(m.designated, _col(m, _mul(sc.at(ds, c, li + 1), sg.head,
                                                                    sg.const)), 0.0), pg)
      else:
        pg = _where(m.skeleton, 0.0, pg)
      if bn:
        pg = pg * _norm_factor(m, ks[li], invert_designated=True)
        if wd_v is not None:
          pg = pg + _where(m.skeleton, 0.0, wd_v)
      out_k.append(pg)
      if bs[li] is None:
        out_b.append(None)
      else:
        pb = _mul(gbs[li], f_out, sg.col, sg.const)
        if wd is not None:
          pb = pb + wd * _mul(bs[li], sc.at(sc.f, c, li + 1), _inv(sg.col))
        out_b.append(pb)
    out.append((out_k, out_b))
  return out


BN_SCALINGS = ("weight", "noweight", None)


def _check_bn_scaling(bn_scaling) -> None:
  if bn_scaling not in BN_SCALINGS:
    raise ValueError(f"bn_scaling must be 'weight', 'noweight' or None, got {bn_scaling!r}.")


def _norm_factor(m: _Masks, kernel, invert_designated: bool):
  """The reference code's BatchNorm factor for one normalized layer (work shape, broadcastable
  over the kernel): ``n(t, j) = ||W[t, :, j]||_2`` at every entry, and at the designated edges
  (skeleton-only paths stored in this layer, output channel ``j``) the centre-tap norm
  ``n(c, j)``, inverted when ``invert_designated`` ('weight' mode divides those gradients)."""
  n = jnp.sqrt(jnp.sum(jnp.square(kernel), axis=m.work.ntaps, keepdims=True))
  if m.designated is None:
    return n
  nc = m.work.col(n[m.work.center].reshape(-1))
  return jnp.where(m.designated, 1.0 / nc if invert_designated else nc, n)


def _check_like(structure: BasisPathStructure, tree: Any, what: str) -> None:
  """``structure.check`` for a params-shaped tree, saying which tree was wrong."""
  try:
    structure.check(tree)
  except ValueError as e:
    raise ValueError(f"In the {what}: {e}") from None


def path_gradients(structure: BasisPathStructure, params: Any, grads: Any,
                   weight_decay: Any = None, scale: Any = None, balance: float = 0.0,
                   bn_scaling: str | None = "weight", fanout_exponent: float = 1.0) -> Any:
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
    scale: optional per-chain path scales ``s`` (``(num_chains,)``, see :func:`path_scales`):
      gradients with respect to ``u = v / s`` are returned, ``s dL/dv + weight_decay * u``.
    balance: in ``[0, 1]``; above 0 the scale becomes per path: ``sigma = s^(1-balance)
      sigma_bal^balance`` with ``sigma_bal`` the path's skeleton product in a balanced gauge
      (a function of skeleton path values: invariant). ``balance=1`` gives non-skeleton weights
      SGD's step in that gauge. Static.
    bn_scaling: for chain layers whose output is normalized (:attr:`Layer.normalized`, only from
      ``trace_structure(..., normalization="reference")``): ``"weight"`` (the reference code's
      default) multiplies the path gradient of each non-skeleton entry ``(t, i, j)`` by
      ``n(t, j) = ||W[t, :, j]||_2`` (the kernel's norm over input channels) and divides the
      gradient of each skeleton-only path stored in the layer at output channel ``j`` by the
      centre-tap norm ``n(c, j)``; weight decay is added after, unscaled. ``"noweight"`` and
      ``None`` leave the gradients alone (``"noweight"`` scales the update in :func:`allocate`).
      Not scale-invariant (normalized chains are not, in this sense). Static.

  Returns:
    ``dL/dv`` (or ``dL/du``) laid out like ``params``.
  """
  structure.check(params)
  _check_like(structure, grads, "gradients")
  _check_bn_scaling(bn_scaling)
  bn_scaling = bn_scaling if structure.normalized_layers else None  # one compiled variant
  static, traced = _split_balance(balance)
  return _auto_axes(functools.partial(_path_gradients_jit, structure, static, bn_scaling,
                                      float(fanout_exponent)), grads)(
      params, grads, weight_decay, scale, traced)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _path_gradients_jit(structure, balance, bn_scaling, fanout, params, grads, weight_decay, scale=None,
                        traced_balance=None):
  balance = traced_balance if balance is None else balance
  leaves, treedef = leaves_with_paths(grads)
  g_lookup = dict(leaves)
  p_lookup = dict(leaves_with_paths(params)[0])
  new = {}
  for chains, masks, (p_leaves, g_leaves) in _groups(structure, p_lookup, g_lookup):
    dtype = p_leaves[0][0][0].dtype
    wd = None if weight_decay is None else jnp.asarray(weight_decay, dtype)
    scales = _chain_scales(structure, chains, scale, dtype)
    for chain, (out_k, out_b) in zip(chains, _group_path_gradients(
        chains, masks, p_leaves, g_leaves, wd, scales, balance, bn_scaling, fanout)):
      _store(chain, new, out_k, out_b)
  if weight_decay is not None:
    for p, g in leaves:
      if p not in new:
        new[p] = g + weight_decay * p_lookup[p]
  return _rebuild(grads, new, leaves, treedef)


# ----------------------------------------------------------------------------------------------
# Weight allocation: path-space update -> exact weight update
# ----------------------------------------------------------------------------------------------

def _group_allocate(chains, masks, p_leaves, d_leaves, min_ratio, scales, balance=0.0,
                    bn_scaling=None, fanout=1.0):
  """Weight updates for the kernels and biases of ``chains``, a list per chain of ``(kernels,
  biases)``, from their path-space updates (in the coordinates ``u = v / sigma`` when ``scales``
  are given: ``dv = sigma du``, see :func:`_sigma`)."""
  if bn_scaling == "noweight":  # the reference code's other mode: scale the path-space update
    d_leaves = [([d * _norm_factor(m, k, invert_designated=False) if layer.normalized else d
                  for d, m, k, layer in zip(dks, ms, ks, chain.layers)], dbs)
                for chain, ms, (ks, _), (dks, dbs) in zip(chains, masks, p_leaves, d_leaves)]
  sc = _scales(chains, masks, [k for k, _ in p_leaves])
  plan = sc.plan
  sigmas = [[_sigma(sc, c, li, len(ks), scales[c], balance, fanout) for li in range(len(ks))]
            for c, (ks, _) in enumerate(p_leaves)]
  heads_sigma = None
  if not _off(balance) and plan.size:  # position order, per node: sigma of the path it heads
    heads_sigma = []
    for c, chain in enumerate(chains):
      L = len(chain.layers)
      for k in range(1, L):
        lr = sc.log_rho[plan.hidden(c, k)]
        fan = np.log(sc.class_fanout[plan.hidden(c, k)])
        heads_sigma.append(_mul(jnp.exp(balance * ((L - 1) / L * lr - fanout * fan)),
                                sigmas[c][k - 1].const))
    heads_sigma = _flat(heads_sigma)

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
      dv = d_leaves[c][0][k - 1][m.work.center][m.idx.in_rows[lo:], m.idx.in_cols[lo:]]
      at = slice(plan.offsets[c][k] + lo, plan.offsets[c][k] + hk)
      dv = _mul(dv, sigmas[c][k - 1].const if heads_sigma is None else heads_sigma[at])
      r_heads.append(1.0 + dv * scale[at])
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
      sg = sigmas[c][li]
      col = _col(m, _mul(sc.at(inv_f, c, li + 1), sg.col))
      # w' = (v + dv) / (B'(i) F(j)) with B'(i) = B(i) R(i), F' = F, dv = sigma du:
      #   dw = w (1/R(i) - 1) + dv / (B(i) F(j) R(i))
      if li == 0:
        dw = _mul(dks[li], col, _row(m, sg.row), sg.const)
      else:
        dw = w * _row(m, sc.at(shrink, c, li)) + _mul(
            dks[li], _row(m, _mul(sc.at(row, c, li), sg.row)), col, sg.const)
      if li < L - 1:
        # designated skeleton edge (p -> j): w' = w R(j) / R(p); other skeleton edges fixed.
        des = w * (_mul(_col(m, sc.at(ratio, c, li + 1)), _row(m, sc.at(inv_r, c, li))) - 1.0)
        dw = _where(m.skeleton, _where(m.designated, des, 0.0), dw)
      else:
        dw = _where(m.skeleton, 0.0, dw)
      out_k.append(dw)
      out_b.append(None if bs[li] is None else _mul(dbs[li], sc.at(inv_f, c, li + 1), sg.col,
                                                     sg.const))
    out.append((out_k, out_b))
  return out


def allocate(structure: BasisPathStructure, params: Any, path_updates: Any,
             min_ratio: float | None = 0.1, scale: Any = None, balance: float = 0.0,
             bn_scaling: str | None = "weight", fanout_exponent: float = 1.0) -> Any:
  """Weight allocation: the weight update that moves every basis-path value by ``path_updates``.

  Skeleton weights outside the first layer of each skeleton-only path stay fixed; the designated
  edge of each skeleton-only path ``s`` absorbs ``R_s = (v_s + dv_s) / v_s``; every other weight
  is solved from its new path value: ``w' = (w + dv / (B F)) / R(i)``. After ``w + update`` the
  basis-path values are exactly ``v + dv`` (inside the guard: ``R`` clipped to
  ``[min_ratio, 1 / min_ratio]``; ``min_ratio=None`` disables the clip).

  Leaves outside G-space pass through unchanged (they already hold weight updates).

  Args:
    structure: the basis-path structure.
    params: current params ``w``.
    path_updates: ``dv`` laid out like ``params`` (weight updates at fallback leaves).
    min_ratio: the skeleton-path guard.
    scale: optional per-chain path scales ``s`` (:func:`path_scales`): ``path_updates`` are then
      updates of ``u = v / s`` and the basis-path values move by ``s * path_updates``.
    balance: per-path scales, as in :func:`path_gradients` (use the same value in both).
    bn_scaling: ``"noweight"`` (the reference code's second BatchNorm mode) multiplies the
      path-space update of each non-skeleton entry of a normalized layer by ``n(t, j)`` and that
      of each skeleton-only path stored there by ``n(c, j)`` (see :func:`path_gradients`) before
      the allocation; ``"weight"`` and ``None`` leave the update alone. Static.

  Returns:
    The weight updates, laid out like ``params``.
  """
  structure.check(params)
  _check_like(structure, path_updates, "path-space updates")
  _check_bn_scaling(bn_scaling)
  bn_scaling = bn_scaling if structure.normalized_layers else None
  static, traced = _split_balance(balance)
  return _auto_axes(functools.partial(_allocate_jit, structure, static, bn_scaling,
                                      float(fanout_exponent), min_ratio),
                    path_updates)(params, path_updates, scale, traced)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _allocate_jit(structure, balance, bn_scaling, fanout, min_ratio, params, path_updates, scale=None,
                  traced_balance=None):
  balance = traced_balance if balance is None else balance
  leaves, treedef = leaves_with_paths(path_updates)
  d_lookup = dict(leaves)
  p_lookup = dict(leaves_with_paths(params)[0])
  new = {}
  for chains, masks, (p_leaves, d_leaves) in _groups(structure, p_lookup, d_lookup):
    scales = _chain_scales(structure, chains, scale, p_leaves[0][0][0].dtype)
    for chain, (out_k, out_b) in zip(chains, _group_allocate(
        chains, masks, p_leaves, d_leaves, min_ratio, scales, balance, bn_scaling, fanout)):
      _store(chain, new, out_k, out_b)
  return _rebuild(path_updates, new, leaves, treedef)
