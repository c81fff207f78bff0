"""Acting on params with a structure: skeleton and basis-path masks, the positive rescaling
group (:func:`rescale`, :func:`random_rescale`) and the reference initialization
(:func:`reset_skeleton`)."""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gsgd_jax._tree import Path, map_with_slices
from gsgd_jax.structure import BasisPathStructure, Chain, skeleton_index

__all__ = ["skeleton_mask", "basis_path_mask", "rescale", "random_rescale", "reset_skeleton"]


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


def _layer_masks(chain: Chain, li: int):
  """Boolean (T, in, out) numpy masks: skeleton edges and designated (basis-path) skeleton edges."""
  layer = chain.layers[li]
  in_skel, out_skel = _skeleton_masks(chain, li)
  shape = (layer.num_taps, layer.in_dim, layer.out_dim)
  idx = skeleton_index(chain, li)
  if idx.parent_tap is None:
    in_tap = out_tap = np.arange(layer.num_taps)[:, None, None] == layer.center_tap
  else:  # each edge at its own tap (Chain.taps)
    in_tap = np.arange(layer.num_taps)[:, None, None] == idx.parent_tap[None, None, :]
    out_tap = np.arange(layer.num_taps)[:, None, None] == idx.child_tap[None, :, None]
  in_skel, out_skel = in_skel & in_tap, out_skel & out_tap
  skel = np.broadcast_to(in_skel | out_skel, shape)
  des = np.broadcast_to(in_skel & ~out_skel, shape)
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

  return map_with_slices(fn, params, structure.stacked)


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
