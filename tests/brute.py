"""Brute-force reference: explicit enumeration of basis paths, independent of gsgd_jax.pathspace.

Each basis path is listed as its edges ``(leaf_path, flat_index)``; path values are products of
those entries, and ``dL/dv`` is solved from ``dL/dw = J^T dL/dv`` by least squares.
"""

from __future__ import annotations

import numpy as np

from gsgd_jax._tree import leaves_with_paths


def enumerate_basis_paths(structure):
  """List of basis paths; each is a list of ``(param_path, flat index into the leaf)``.

  Built from the written convention (docs/gsgd-method.md, section 2) by walking nodes, not from
  masks: back along incoming skeleton edges ``j -> j mod h[l-1]``, forward along outgoing
  skeleton edges ``i -> i mod h[l+1]``.
  """
  paths = []
  for chain in structure.chains:
    L = len(chain.layers)
    h = chain.widths

    def kidx(l, t, i, j):
      layer = chain.layers[l]
      return (layer.kernel, int(np.ravel_multi_index((t, i, j), (layer.num_taps, layer.in_dim, layer.out_dim))))

    def center(l):
      return chain.layers[l].center_tap

    def back(k, i):  # edges from node i of set k back to an input
      edges = []
      while k > 0:
        p = i % h[k - 1]
        edges.append(kidx(k - 1, center(k - 1), p, i))
        k, i = k - 1, p
      return edges

    def fwd(k, j):  # edges from node j of set k forward to an output
      edges = []
      while k < L:
        c = j % h[k + 1]
        edges.append(kidx(k, center(k), j, c))
        k, j = k + 1, c
      return edges

    def is_skel(l, t, i, j):
      if t != center(l):
        return False
      inc = l < L - 1 and i == j % h[l]
      out = l > 0 and j == i % h[l + 1]
      return inc or out

    for l, layer in enumerate(chain.layers):
      for t in range(layer.num_taps):
        for i in range(layer.in_dim):
          for j in range(layer.out_dim):
            if not is_skel(l, t, i, j):
              paths.append(back(l, i) + [kidx(l, t, i, j)] + fwd(l + 1, j))
      if layer.bias is not None:
        for j in range(layer.out_dim):
          paths.append([(layer.bias, j)] + fwd(l + 1, j))
    # skeleton-only paths: one per hidden node whose incoming skeleton edge is not diagonal
    for k in range(1, L):
      for j in range(h[k]):
        if k == 1 or j >= h[k - 1]:
          paths.append(back(k, j) + fwd(k, j))
  return paths


def path_value_fn(structure, paths):
  """``f(params) -> array of basis-path values`` (jax-differentiable)."""
  import jax.numpy as jnp

  def fn(params):
    leaves = {p: jnp.ravel(x) for p, x in leaves_with_paths(params)[0]}
    vals = []
    for path in paths:
      v = 1.0
      for leaf, idx in path:
        v = v * leaves[leaf][idx]
      vals.append(v)
    return jnp.stack(vals)

  return fn
