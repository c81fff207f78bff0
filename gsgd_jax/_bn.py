"""The reference code's BatchNorm heuristic (``BasisPathStructure.bn_scaling``), applied by
:mod:`gsgd_jax.pathspace` to the layers flagged ``Layer.normalized`` only. Not exact, not
scale-invariant (``docs/method.md``)."""

from __future__ import annotations

import jax.numpy as jnp

from gsgd_jax._layout import _Masks

def bn_factor(m: _Masks, kernel, invert_designated: bool):
  """The reference code's BatchNorm factor for one normalized layer (work shape, broadcastable
  over the kernel): ``n(t, j) = ||W[t, :, j]||_2`` at every entry, and at the designated edges
  (skeleton-only paths stored in this layer, output channel ``j``) the norm ``n(c, j)`` at the
  tap ``c`` of that skeleton edge (the centre tap unless ``Chain.taps`` says otherwise), inverted
  when ``invert_designated`` ('weight' mode divides those gradients)."""
  n = jnp.sqrt(jnp.sum(jnp.square(kernel), axis=m.work.ntaps, keepdims=True))
  if m.designated is None:
    return n
  if m.parent_tap is None:
    nc = m.work.col(n[m.work.center].reshape(-1))
  else:  # the norm at each column's skeleton tap: a masked sum over the taps
    taps = tuple(range(m.work.ntaps))
    nc = jnp.sum(jnp.where(m.work.tap_mask(m.parent_tap, 1), n, 0.0), axis=taps, keepdims=True)
  return jnp.where(m.designated, 1.0 / nc if invert_designated else nc, n)
