"""Brute-force reference: explicit enumeration of basis paths, independent of gsgd_jax.pathspace.

Each basis path is listed as its edges ``(leaf_path, flat_index)``; path values are products of
those entries, and ``dL/dv`` is solved from ``dL/dw = J^T dL/dv`` by least squares.
"""

from __future__ import annotations

import numpy as np

from gsgd_jax._tree import is_slice, leaves_with_paths


def _at(path, i, size):
  """Edge ``i`` of the leaf or slice ``path`` as ``(leaf path, flat index into the leaf)``: slice
  ``s`` of a stacked leaf (scanned layers) starts at ``s * size``."""
  return (path[:-1], path[-1].index * size + i) if is_slice(path) else (path, i)


def enumerate_basis_paths(structure, meta=False):
  """Basis paths as ``(pivot, edges)``: edges are ``(param_path, flat index into the leaf)``.

  The pivot is where gsgd_jax stores the path: its non-skeleton edge, its bias, or (skeleton-only
  paths) the incoming skeleton edge of the first node of its run.

  Built from the written convention (docs/method.md, "Chains, node sets, skeleton") by walking nodes, not from
  masks: back along incoming skeleton edges ``j -> j mod h[l-1]``, forward along outgoing
  skeleton edges ``i -> i mod h[l+1]``. Node indices are skeleton positions; for an aligned
  skeleton, position ``p`` of hidden set ``k`` is unit ``chain.perms[k-1][p]`` (read here directly
  from the permutation tuples) and, for a convolution, the skeleton edge of a channel pair is at
  ``chain.taps`` (the centre tap when ``None``); these two tuples are the only input taken from
  gsgd_jax.

  With ``meta=True`` also returns, per path, the factors of its balanced-gauge scale
  ``sigma_bal = prod |rho(u)|^e`` as ``[(edges of the skeleton path through u, e), ...]``:
  ``rho(u)^(l/L)`` of the edge's source node in set ``l`` and ``rho(j)^((L-1-l)/L)`` of its
  target node, ``rho(u)^((L-1)/L) / n`` for the skeleton-only path headed at ``u``, ``n``
  the number of non-skeleton kernel entries leaving its class (a factor is ``(edges, e)`` or a
  constant ``(c, 1.0)``).
  """
  paths, metas = [], []
  for chain in structure.chains:
    L = len(chain.layers)
    h = chain.widths
    perms = chain.perms

    def unit(k, p):  # unit at skeleton position p of node set k
      if perms is None or k == 0 or k == L:
        return p
      return perms[k - 1][p]

    def kidx(l, t, i, j):  # layer l, tap t, positions i (set l) -> j (set l + 1)
      layer = chain.layers[l]
      shape = (layer.num_taps, layer.in_dim, layer.out_dim)
      return _at(layer.kernel, int(np.ravel_multi_index((t, unit(l, i), unit(l + 1, j)), shape)),
                 int(np.prod(shape)))

    taps = chain.taps

    def in_tap(l, j):  # tap of the incoming skeleton edge of position j of set l + 1
      if taps is None or taps[l] is None:
        return chain.layers[l].center_tap
      return taps[l][0][j]

    def out_tap(l, i):  # tap of the outgoing skeleton edge of position i of set l
      if taps is None or taps[l] is None:
        return chain.layers[l].center_tap
      return taps[l][1][i]

    def back(k, i):  # edges from node i of set k back to an input
      edges = []
      while k > 0:
        p = i % h[k - 1]
        edges.append(kidx(k - 1, in_tap(k - 1, i), p, i))
        k, i = k - 1, p
      return edges

    def fwd(k, j):  # edges from node j of set k forward to an output
      edges = []
      while k < L:
        c = j % h[k + 1]
        edges.append(kidx(k, out_tap(k, j), j, c))
        k, j = k + 1, c
      return edges

    def class_fanout(k, j):  # non-skeleton kernel entries leaving the class headed at (k, j)
      n = 0
      while True:
        n += chain.layers[k].num_taps * h[k + 1] - 1
        if k + 1 < L and j < h[k + 1]:
          k += 1
        else:
          return n

    def skel(k, u):  # the skeleton path through node u of set k (empty for inputs / outputs)
      return [] if k in (0, L) else back(k, u) + fwd(k, u)

    def is_skel(l, t, i, j):
      inc = l < L - 1 and i == j % h[l] and t == in_tap(l, j)
      out = l > 0 and j == i % h[l + 1] and t == out_tap(l, i)
      return inc or out

    for l, layer in enumerate(chain.layers):
      for t in range(layer.num_taps):
        for i in range(layer.in_dim):
          for j in range(layer.out_dim):
            if not is_skel(l, t, i, j):
              paths.append((kidx(l, t, i, j), back(l, i) + [kidx(l, t, i, j)] + fwd(l + 1, j)))
              metas.append([(skel(l, i), l / L), (skel(l + 1, j), (L - 1 - l) / L)])
      if layer.bias is not None:
        for j in range(layer.out_dim):
          b = _at(layer.bias, unit(l + 1, j), layer.out_dim)
          paths.append((b, [b] + fwd(l + 1, j)))
          metas.append([(skel(l + 1, j), (L - 1 - l) / L)])
    # skeleton-only paths: one per hidden node whose incoming skeleton edge is not diagonal
    for k in range(1, L):
      for j in range(h[k]):
        if k == 1 or j >= h[k - 1]:
          paths.append((kidx(k - 1, in_tap(k - 1, j), j % h[k - 1], j), back(k, j) + fwd(k, j)))
          metas.append([(skel(k, j), (L - 1) / L), (class_fanout(k, j) ** -1.0, 1.0)])
  return (paths, metas) if meta else paths


def path_value_fn(structure, paths):
  """``f(params) -> array of basis-path values`` (jax-differentiable, jitted).

  Gathers the edges of every path from the concatenated leaves and multiplies them.
  """
  import jax
  import jax.numpy as jnp

  def build_index(params):
    offsets, start = {}, 0
    for p, x in leaves_with_paths(params)[0]:
      offsets[p] = start
      start += int(np.size(x))
    longest = max(len(edges) for _, edges in paths)
    idx = np.full((len(paths), longest), start, np.int64)  # `start` points at a trailing 1.0
    for r, (_, edges) in enumerate(paths):
      for c, (leaf, i) in enumerate(edges):
        idx[r, c] = offsets[leaf] + i
    return idx

  cache = {}

  @jax.jit
  def fn(params):
    if "idx" not in cache:
      cache["idx"] = build_index(params)
    flat_params = jnp.concatenate([jnp.ravel(x) for _, x in leaves_with_paths(params)[0]])
    flat_params = jnp.concatenate([flat_params, jnp.ones((1,), flat_params.dtype)])
    return jnp.prod(flat_params[cache["idx"]], axis=1)

  return fn


def at_pivots(structure, paths, tree):
  """Reads a params-shaped tree (e.g. gsgd_jax path values/gradients) at each path's pivot."""
  leaves = {p: np.ravel(np.asarray(x)) for p, x in leaves_with_paths(tree)[0]}
  return np.array([leaves[leaf][idx] for (leaf, idx), _ in paths])


def flat_jacobian(fn, params):
  """Jacobian of ``fn`` (vector output) w.r.t. all leaves of ``params``, as a 2-D numpy array."""
  import jax
  jac = jax.jacobian(fn)(params)
  rows = None
  blocks = []
  for _, x in leaves_with_paths(jac)[0]:
    x = np.asarray(x)
    rows = x.shape[0]
    blocks.append(x.reshape(rows, -1))
  return np.concatenate(blocks, axis=1)


def flat(tree):
  return np.concatenate([np.ravel(np.asarray(x)) for _, x in leaves_with_paths(tree)[0]])


def balanced_sigmas(metas, params):
  """``sigma_bal`` of every path from :func:`enumerate_basis_paths` ``(..., meta=True)``."""
  leaves = {p: np.ravel(np.asarray(x, np.float64)) for p, x in leaves_with_paths(params)[0]}
  out = []
  for factors in metas:
    sigma = 1.0
    for edges, e in factors:
      if isinstance(edges, float):
        sigma *= edges ** e
      elif edges and e:
        sigma *= abs(np.prod([leaves[leaf][i] for leaf, i in edges])) ** e
    out.append(sigma)
  return np.asarray(out)
