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
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gsgd_jax._bn import bn_factor
from gsgd_jax._layout import (_Masks, _auto_axes, _chain_sum, _flat, _groups, _inv, _materialize,
                              _mul, _rebuild, _run_layers, _where, _work, compute_dtype)
from gsgd_jax._scales import (_chain_scales, _off, _scales, _sigma, path_scales,
                              smallest_skeleton_path)
from gsgd_jax._tree import leaves_with_paths, restack
from gsgd_jax.coordinates import PAPER, PathCoordinates
from gsgd_jax.structure import BasisPathStructure

__all__ = ["basis_path_values", "path_gradients", "allocate", "path_scales",
           "smallest_skeleton_path", "compute_dtype"]





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
  lookup = structure.leaves(params)
  new = {}
  for chains, masks, (kb,) in _groups(structure, lookup):
    sc = _scales(chains, masks, [k for k, _ in kb], guard=False)
    vecs = [[(sc.at(sc.b, c, li), sc.at(sc.f, c, li + 1),
              sc.at(sc.b, c, li + 1) * sc.at(sc.f, c, li + 1) if li < len(chain.layers) - 1
              else None) for li in range(len(chain.layers))] for c, chain in enumerate(chains)]
    _run_layers(chains, masks, (lookup,), kb[0][0][0].dtype, _inputs(kb), vecs, _values_body,
                new)
  return _rebuild(params, new, leaves, treedef)


def _inputs(*trees):
  """``inputs[c][li] = (kernels, biases)`` of :func:`_run_layers` from ``_groups``' leaves."""
  out = []
  for per_chain in zip(*trees):
    ks = list(zip(*[k for k, _ in per_chain]))
    bs = list(zip(*[b for _, b in per_chain]))
    out.append([(k, None if b[0] is None else b) for k, b in zip(ks, bs)])
  return out


def _values_body(m, ks, bs, vecs, flags):
  """Basis-path values of one layer (see :func:`basis_path_values`)."""
  (k,) = ks
  b_in, f_out, vs_col = vecs
  v = _mul(k, _row(m, b_in), _col(m, f_out))
  # Skeleton-only path of a class-first node j: B(j) F(j), stored at its designated edge.
  vs = 0.0 if flags[1] else _col(m, vs_col)
  v = _where(m.skeleton, _where(m.designated, vs, 0.0), v)
  return v, (None if bs is None else _mul(bs[0], f_out))


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


def _stack_row_sums(structure, p_lookup, g_lookup, dtype):
  """``{slice path: row sum of w * g}`` of every stacked kernel (scanned layers) of ``dtype``.

  One reduction over each stacked leaf: a reduction over each slice reads its slice as a copy on
  XLA:CPU (measured 3-4x slower than the unrolled layers' reductions)."""
  out = {}
  for leaf in structure.stacked:
    layers = [l for c in structure.chains for l in c.layers if l.kernel[:-1] == leaf]
    if not layers or compute_dtype(jnp.result_type(p_lookup[leaf])) != dtype:
      continue
    work = _work(layers[0])
    w = jnp.asarray(p_lookup[leaf]).astype(dtype).reshape((-1,) + work.shape)
    g = jnp.asarray(g_lookup[leaf]).astype(dtype).reshape((-1,) + work.shape)
    sums = jax.vmap(work.row_sum)(w * g)
    for layer in layers:
      out[layer.kernel] = sums[layer.kernel[-1].index]
  return out


def _group_path_gradients(chains, masks, p_leaves, g_leaves, weight_decay, scales,
                          balance=0.0, fanout=1.0, row_sums=None):
  """The O(h) vectors of every layer of ``chains`` that :func:`_gradients_body` turns into
  ``dL/dv`` (``vecs[c][li]``, see :func:`_run_layers`). ``row_sums``: precomputed row sums of
  ``w * g`` by kernel path (:func:`_stack_row_sums`)."""
  row_sums = row_sums or {}
  sc = _scales(chains, masks, [k for k, _ in p_leaves])
  plan = sc.plan

  ds = None
  if plan.size:
    # BK(u): sum of x = w * g over the basis paths whose back chain passes through hidden node u
    # and whose own edge lies after u: every edge leaving u except its outgoing skeleton edge,
    # plus BK of the next node of u's skeleton class (a sum along the static `next` chain).
    rows, x_in = [], []
    for chain, ms, (ks, _), (gks, _) in zip(chains, masks, p_leaves, g_leaves):
      for k in range(1, len(ks)):
        mk, mp = ms[k], ms[k - 1]
        # (the row sum reads w and g once; the skeleton entry is subtracted from O(h) gathers,
        # as masking it inside the reduction measured slower on CPU)
        rs = row_sums.get(chain.layers[k].kernel)
        rows.append(mk.by_position(mk.work.row_sum(ks[k] * gks[k]) if rs is None else rs)
                    - mk.out_skeleton(ks[k]) * mk.out_skeleton(gks[k]))
        x_in.append(mp.in_skeleton(ks[k - 1]) * mp.in_skeleton(gks[k - 1]))
    bk = _chain_sum(_flat(rows), plan.next)
    # v_s dL/dv_s of the skeleton-only path of each class-first node u, then dL/dv_s = y / v_s.
    ds = (_flat(x_in) - bk) * sc.inv_b * sc.inv_f
  # Pinned in groups of equal dependencies: B and F need only the params, ds all row sums.
  ds = _pin(ds)
  inv_b, inv_f = _pin(sc.inv_b, sc.inv_f)

  vecs = []
  for c, (ks, _) in enumerate(p_leaves):
    L = len(ks)
    per = []
    for li in range(L):
      # gradients in the coordinates u = v / sigma: sigma dL/dv (+ weight_decay * u)
      sg = _sigma(sc, c, li, L, scales[c], balance, fanout)
      wd = None if weight_decay is None else _mul(weight_decay, _inv(sg.const))
      per.append((sc.at(inv_b, c, li), sc.at(inv_f, c, li + 1), sg.row, sg.col, sg.const, sg.head,
                  wd, sc.at(sc.b, c, li), sc.at(sc.f, c, li + 1),
                  sc.at(ds, c, li + 1) if li < L - 1 else None))
    vecs.append(per)
  return vecs


def _gradients_body(m, ks, bs, vecs, flags, bn_scaling=None):
  """``sigma dL/dv`` of one layer (see :func:`path_gradients`)."""
  k, g = ks
  inv_b_in, f_out, s_row, s_col, s_const, s_head, wd, b_in, f_plain, ds_out = vecs
  _, last, normalized = flags
  # sigma g_e / (B(i) F(j))
  pg = _mul(g, _row(m, _mul(inv_b_in, s_row)), _col(m, _mul(f_out, s_col)), s_const)
  wd_v = None
  if wd is not None:
    v = _mul(k, _row(m, _mul(b_in, _inv(s_row))), _col(m, _mul(f_plain, _inv(s_col))))
    wd_v = wd * v
  if not last:
    pg = _where(m.skeleton, _where(m.designated, _col(m, _mul(ds_out, s_head, s_const)), 0.0), pg)
  else:
    pg = _where(m.skeleton, 0.0, pg)
  if bn_scaling == "weight" and normalized:
    pg = pg * bn_factor(m, k, invert_designated=True)  # the reference code's heuristic
  if wd_v is not None:  # after the heuristic, unscaled
    pg = pg + _where(m.skeleton, 0.0, wd_v)
  pb = None
  if bs is not None:
    b, gb = bs
    pb = _mul(gb, f_out, s_col, s_const)
    if wd is not None:
      pb = pb + wd * _mul(b, f_plain, _inv(s_col))
  return pg, pb




def _check_like(structure: BasisPathStructure, tree: Any, what: str) -> None:
  """``structure.check`` for a params-shaped tree, saying which tree was wrong."""
  try:
    structure.check(tree)
  except ValueError as e:
    raise ValueError(f"In the {what}: {e}") from None


def path_gradients(structure: BasisPathStructure, params: Any, grads: Any,
                   weight_decay: Any = None, *, coordinates: PathCoordinates = PAPER,
                   path_scale: Any = None) -> Any:
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
    coordinates: the coordinates ``u = v / sigma`` to differentiate in
      (:class:`gsgd_jax.PathCoordinates`): the gradient ``sigma dL/dv + weight_decay * u`` is
      returned. The default, :data:`gsgd_jax.PAPER`, is the path values themselves
      (``sigma = 1``: ``dL/dv``), the maths of ``docs/method.md``; the optax blocks pass their
      own (``PathCoordinates()`` by default).
    path_scale: the per-chain scales ``s`` (``(num_chains,)``, :func:`path_scales`) that
      ``sigma`` uses when ``coordinates.balance < 1``; computed from ``params`` if ``None``.
    (``structure.bn_scaling``, for chain layers whose output is normalized: ``"weight"``, the
    reference code's default, multiplies the path gradient of each non-skeleton entry
    ``(t, i, j)`` by ``n(t, j) = ||W[t, :, j]||_2`` (the kernel's norm over input channels) and
    divides the gradient of each skeleton-only path stored in the layer at output channel ``j`` by
    the centre-tap norm ``n(c, j)``; weight decay is added after, unscaled. ``"noweight"`` scales
    the update in :func:`allocate` instead. Not scale-invariant.)

  Returns:
    ``dL/dv`` (or ``dL/du``) laid out like ``params``.
  """
  structure.check(params)
  _check_like(structure, grads, "gradients")
  bn_scaling = structure.bn_scaling if structure.normalized_layers else None
  scale = _scale_of(structure, params, coordinates, path_scale)
  return _auto_axes(functools.partial(_path_gradients_jit, structure, coordinates.balance_used,
                                      bn_scaling, float(coordinates.fanout_exponent)), grads)(
      params, grads, weight_decay, scale)


def _scale_of(structure, params, coordinates: PathCoordinates, path_scale):
  """The per-chain scales ``s`` where ``sigma`` needs them (``None`` elsewhere)."""
  if not coordinates.needs_path_scale:
    return None
  return path_scales(structure, params) if path_scale is None else path_scale


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _path_gradients_jit(structure, balance, bn_scaling, fanout, params, grads, weight_decay,
                        scale=None):
  leaves, treedef = leaves_with_paths(grads)
  g_lookup = structure.leaves(grads)
  p_lookup = structure.leaves(params)
  new = {}
  for chains, masks, (p_leaves, g_leaves) in _groups(structure, p_lookup, g_lookup):
    dtype = p_leaves[0][0][0].dtype
    wd = None if weight_decay is None else jnp.asarray(weight_decay, dtype)
    scales = _chain_scales(structure, chains, scale, dtype)
    row_sums = _stack_row_sums(structure, p_lookup, g_lookup, dtype) if structure.stacked else None
    vecs = _group_path_gradients(chains, masks, p_leaves, g_leaves, wd, scales, balance, fanout,
                                 row_sums)
    _run_layers(chains, masks, (p_lookup, g_lookup), dtype, _inputs(p_leaves, g_leaves), vecs,
                functools.partial(_gradients_body, bn_scaling=bn_scaling), new)
  new = restack(new)
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
  """The O(h) vectors of every layer of ``chains`` (``vecs[c][li]``, see :func:`_run_layers`)
  that :func:`_allocate_body` turns into weight updates from the path-space updates (in the
  coordinates ``u = v / sigma`` when ``scales`` are given: ``dv = sigma du``, see
  :func:`_sigma`), and ``d_leaves`` (scaled for ``bn_scaling='noweight'``)."""
  if bn_scaling == "noweight":  # the reference code's other mode: scale the path-space update
    d_leaves = [([d * bn_factor(m, k, invert_designated=False) if layer.normalized else d
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
      dv = m.in_skeleton(d_leaves[c][0][k - 1], lo)
      at = slice(plan.offsets[c][k] + lo, plan.offsets[c][k] + hk)
      dv = _mul(dv, sigmas[c][k - 1].const if heads_sigma is None else heads_sigma[at])
      r_heads.append(1.0 + dv * scale[at])
    r_new = _flat(r_heads)
    if min_ratio is not None:
      r_new = jnp.clip(r_new, min_ratio, 1.0 / min_ratio)
    r = r_new[plan.first]
    ratio, inv_r, shrink, row = _pin(r, 1.0 / r, 1.0 / r - 1.0, sc.inv_b / r)
  inv_b, inv_f = _pin(sc.inv_b, sc.inv_f)

  vecs = []
  for c, (ks, _) in enumerate(p_leaves):
    per = []
    for li in range(len(ks)):
      sg = sigmas[c][li]
      per.append((_mul(sc.at(inv_f, c, li + 1), sg.col), sg.row, sg.const, sc.at(shrink, c, li),
                  sc.at(row, c, li), sc.at(ratio, c, li + 1), sc.at(inv_r, c, li),
                  sc.at(inv_f, c, li + 1), sg.col))
    vecs.append(per)
  return vecs, d_leaves


def _allocate_body(m, ks, bs, vecs, flags):
  """The weight update of one layer (see :func:`allocate`)."""
  w, dk = ks
  col_a, s_row, s_const, shrink_in, row_in, ratio_out, inv_r_in, f_out, s_col = vecs
  first, last, _ = flags
  col = _col(m, col_a)
  # w' = (v + dv) / (B'(i) F(j)) with B'(i) = B(i) R(i), F' = F, dv = sigma du:
  #   dw = w (1/R(i) - 1) + dv / (B(i) F(j) R(i))
  if first:
    dw = _mul(dk, col, _row(m, s_row), s_const)
  else:
    dw = w * _row(m, shrink_in) + _mul(dk, _row(m, _mul(row_in, s_row)), col, s_const)
  if not last:
    # designated skeleton edge (p -> j): w' = w R(j) / R(p); other skeleton edges fixed.
    des = w * (_mul(_col(m, ratio_out), _row(m, inv_r_in)) - 1.0)
    dw = _where(m.skeleton, _where(m.designated, des, 0.0), dw)
  else:
    dw = _where(m.skeleton, 0.0, dw)
  return dw, (None if bs is None else _mul(bs[1], f_out, s_col, s_const))


def allocate(structure: BasisPathStructure, params: Any, path_updates: Any, *,
             coordinates: PathCoordinates = PAPER, path_scale: Any = None) -> Any:
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
    coordinates: the coordinates ``path_updates`` are updates of (``u = v / sigma``: the
      basis-path values move by ``sigma * path_updates``) and the skeleton-path guard
      ``min_ratio`` (:class:`gsgd_jax.PathCoordinates`; default :data:`gsgd_jax.PAPER`, the path
      values themselves, with ``min_ratio=0.1``).
    path_scale: as in :func:`path_gradients`.
    (``structure.bn_scaling == "noweight"``, the reference code's second BatchNorm mode,
    multiplies the path-space update of each non-skeleton entry of a normalized layer by
    ``n(t, j)`` and that of each skeleton-only path stored there by ``n(c, j)`` before the
    allocation.)

  Returns:
    The weight updates, laid out like ``params``.
  """
  structure.check(params)
  _check_like(structure, path_updates, "path-space updates")
  bn_scaling = structure.bn_scaling if structure.normalized_layers else None
  scale = _scale_of(structure, params, coordinates, path_scale)
  return _auto_axes(functools.partial(_allocate_jit, structure, coordinates.balance_used,
                                      bn_scaling, float(coordinates.fanout_exponent),
                                      coordinates.min_ratio),
                    path_updates)(params, path_updates, scale)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _allocate_jit(structure, balance, bn_scaling, fanout, min_ratio, params, path_updates,
                  scale=None):
  leaves, treedef = leaves_with_paths(path_updates)
  d_lookup = structure.leaves(path_updates)
  p_lookup = structure.leaves(params)
  new = {}
  for chains, masks, (p_leaves, d_leaves) in _groups(structure, p_lookup, d_lookup):
    scales = _chain_scales(structure, chains, scale, p_leaves[0][0][0].dtype)
    vecs, d_leaves = _group_allocate(chains, masks, p_leaves, d_leaves, min_ratio, scales,
                                     balance, bn_scaling, fanout)
    # ('noweight' scales the path-space updates of normalized layers first: read one by one)
    _run_layers(chains, masks, (p_lookup, d_lookup), p_leaves[0][0][0].dtype,
                _inputs(p_leaves, d_leaves), vecs, _allocate_body, new,
                vectorize=bn_scaling != "noweight")
  return _rebuild(path_updates, new, leaves, treedef)
