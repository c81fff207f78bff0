"""Per-node skeleton products and the path coordinates.

``B(u)`` and ``F(u)`` (products of skeleton weights back to an input and forward to an output,
accumulated in log space and clipped, see :mod:`gsgd_jax.pathspace`), and the per-path scales
``sigma`` of the coordinates ``u = v / sigma`` that :class:`gsgd_jax.PathCoordinates` chooses:
the per-chain scale ``s`` (:func:`path_scales`) and the balanced-gauge scales (``balance``,
``fanout_exponent``). All functions of skeleton path values: invariant under rescaling.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gsgd_jax._layout import (_chain_dtype, _chain_leaves, _chain_sum, _explicit_mesh, _flat, _Plan,
                              _plan_of, skeleton_entries, _work)
from gsgd_jax._tree import Path
from gsgd_jax.structure import BasisPathStructure, Chain, skeleton_index

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
    a, b = _skeleton_entries(chain, ks, jnp)
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


def _skeleton_entries(chain: Chain, kernels, xp):
  """``(s_in, s_out)``: the incoming and the outgoing skeleton weight of every hidden node of
  ``chain`` (flat, skeleton-position order; O(h) gathers) from its kernels (work shape);
  ``xp``: numpy or jax.numpy."""
  def entries(k, incoming):
    return skeleton_entries(_work(chain.layers[k]), skeleton_index(chain, k), kernels[k], incoming)
  s_in = [entries(k - 1, True) for k in range(1, len(kernels))]
  s_out = [entries(k, False) for k in range(1, len(kernels))]
  return xp.concatenate(s_in), xp.concatenate(s_out)


def _log_b_plus_f(chain: Chain, kernels, log, xp, plan: _Plan):
  """``log|B(u)| + log|F(u)|`` of every hidden node ``u`` of ``chain`` (flat, skeleton-position
  order) from its kernels (work shape); ``xp``: numpy or jax.numpy."""
  s_in, s_out = _skeleton_entries(chain, kernels, xp)
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
  leaves = structure.leaves(params)
  out = []
  for chain in structure.chains:
    L = len(chain.layers)
    plan = _plan_of((chain,))
    dtype = _chain_dtype(chain, leaves)
    if not plan.size:
      out.append(jnp.ones((), dtype))
      continue
    ks, _ = _chain_leaves(chain, leaves, dtype)
    log_v = _log_b_plus_f(chain, ks, jnp.log, jnp, plan)
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
  leaves = structure.leaves(params)
  smallest, where = np.inf, None
  for chain in structure.chains:
    plan = _plan_of((chain,))
    if not plan.size:
      continue
    kernels = [np.asarray(leaves[layer.kernel], np.float64).reshape(_work(layer).shape)
               for layer in chain.layers]
    h = chain.widths
    with np.errstate(divide="ignore"):
      log_v = _log_b_plus_f(chain, kernels, np.log, np, plan)
    for _, k, lo in plan.heads:
      start = plan.offsets[0][k]
      m = float(np.exp(np.min(log_v[start + lo:start + h[k]])))
      if m < smallest:
        smallest, where = m, chain.layers[k - 1].kernel
  return smallest, where
