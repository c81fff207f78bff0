"""Input checks of the G-space optimizers: params (zero skeleton weights, tiny skeleton paths),
gradients (NaN/Inf), learning rates, and the notes ``tx.init`` gives once per transform."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import optax

from gsgd_jax._warnings import GSpaceWarning
from gsgd_jax import pathspace
from gsgd_jax._tree import leaves_with_paths, path_str
from gsgd_jax.gauge import skeleton_mask
from gsgd_jax.structure import BasisPathStructure

def check_params(structure: BasisPathStructure, params: Any) -> None:
  """Raises a ``ValueError`` if a skeleton weight is zero or not finite (outside jit only).

  A zero skeleton weight makes every basis path through it zero, so ``dL/dv`` is undefined there.
  The message names the parameter and the index; re-initialize, or call
  :func:`gsgd_jax.reset_skeleton` to set skeleton weights to 1 as the reference code does.
  Also warns when skeleton-only path values are tiny (the exact step then explodes).

  Args:
    structure: the basis-path structure.
    params: concrete params (numpy or JAX arrays, not tracers).

  Returns:
    None.

  Raises:
    ValueError: a parameter the structure expects is missing or mis-shaped, or a skeleton weight
      is zero or not finite.
  """
  structure.check(params)
  mask = dict(leaves_with_paths(skeleton_mask(structure, params))[0])
  for path, x in leaves_with_paths(params)[0]:
    if path not in mask:
      continue
    x = np.asarray(x)
    m = np.asarray(mask[path])
    bad = m & ~(np.isfinite(x) & (x != 0))
    if bad.any():
      idx = tuple(int(i) for i in np.argwhere(bad)[0])
      raise ValueError(
          f"Skeleton weight {path_str(path)}[{idx}] is {x[idx]!r} ({int(bad.sum())} bad skeleton "
          "weights in this leaf): G-SGD needs non-zero, finite skeleton weights. Re-initialize, "
          "or call gsgd_jax.reset_skeleton(structure, params) to set them to 1.0.")
  _warn_small_skeleton_paths(structure, params)


def _warn_small_skeleton_paths(structure: BasisPathStructure, params: Any,
                               threshold: float = 1e-2) -> None:
  """Warns when skeleton-only path values are tiny: the exact G-SGD step then explodes.

  Host-side numpy on the O(h) skeleton entries (no compilation), see
  :func:`gsgd_jax.pathspace.smallest_skeleton_path`.
  """
  smallest, where = pathspace.smallest_skeleton_path(structure, params)
  modulo = any(c.skeleton == "modulo" and len(c.layers) > 1 for c in structure.chains)
  # An aligned skeleton with per-path scales (balance=1) takes SGD-sized steps whatever v is;
  # only a degenerate skeleton path is worth a word there.
  if smallest >= (threshold if modulo else threshold ** 4):
    return
  if modulo:
    fix = ("Choose the skeleton from the weights (one call, before building the optimizer): "
           "structure = gsgd_jax.infer_structure(params) (or gsgd_jax.trace_structure(apply_fn, "
           "params, x)), then pass structure=structure; it is aligned by default.")
  else:
    fix = ("The skeleton is already aligned to these weights: lower the learning rate, keep "
           "the default PathCoordinates, or start from gsgd_jax.reset_skeleton(structure, params).")
  warnings.warn(
      f"Skeleton-only basis paths have values as small as {smallest:.2e} (stored at "
      f"{path_str(where)}, {'modulo' if fix.startswith('Choose') else 'aligned'} skeleton): "
      f"G-space steps scale like 1 / v^2 there and can be huge. {fix}", GSpaceWarning, stacklevel=4)


def check_gradients(grads: Any) -> None:
  """Raises a ``ValueError`` naming the first leaf with NaN/Inf gradients (outside jit only).

  Inside jit, non-finite gradients propagate into non-finite updates (nothing is hidden); wrap the
  optimizer in ``optax.apply_if_finite`` to skip such steps.

  Args:
    grads: concrete gradients (any pytree of arrays).

  Returns:
    None.

  Raises:
    ValueError: naming the first leaf with non-finite entries and how many there are.
  """
  for path, g in leaves_with_paths(grads)[0]:
    g = np.asarray(g)
    if not np.all(np.isfinite(g)):
      raise ValueError(f"Gradient of {path_str(path)} has {int((~np.isfinite(g)).sum())} non-finite "
                       "entries. Check the loss, lower the learning rate, or wrap the optimizer in "
                       "optax.apply_if_finite(...) to skip such steps.")


def _check_learning_rate(learning_rate) -> None:
  if isinstance(learning_rate, (int, float)) and not isinstance(learning_rate, bool):
    if not learning_rate > 0:
      raise ValueError(f"learning_rate must be positive, got {learning_rate!r}. G-SGD descends: "
                       "pass a positive number or an optax schedule.")


def _note_inferred(s: BasisPathStructure) -> None:
  """Says which chain ``structure=None`` inferred from names, and how to make sure of it."""
  chains = "; ".join(" -> ".join(path_str(l.kernel).rsplit("/", 1)[0] for l in c.layers)
                     for c in s.chains) or "none"
  warnings.warn(
      f"gsgd_jax: no structure given, so G-space was inferred from parameter names: chain "
      f"{chains} (skeleton aligned to the params given to tx.init: the same as "
      "structure=gsgd_jax.infer_structure(params)). Names cannot show skip connections, shared "
      "layers or non-ReLU activations: check it with gsgd_jax.verify_structure(structure, "
      "apply_fn, params, x), or build the structure from the model, "
      "gsgd_jax.trace_structure(apply_fn, params, x) (nnx: gsgd_jax.trace_nnx_structure(model, "
      "x)), and pass structure=structure.", GSpaceWarning, stacklevel=4)


def _note_nothing_in_gspace(s: BasisPathStructure, inferred: bool, fallback: Any) -> None:
  """Says that no parameter is in G-space (a plain array, a tree without Dense/Conv kernels, or
  a structure without chains): the transform then trains everything in weight space."""
  who = ("the fallback transform" if isinstance(fallback, optax.GradientTransformation)
         else "the same optimizer (e.g. SGD for gsgd, Adam for gsgd_adam)")
  why = ("no Dense/Conv `kernel` leaf was found in the params" if inferred
         else "the structure has no chain")
  warnings.warn(
      f"gsgd_jax: nothing is in G-space ({why}; {len(s.fallback)} leaves), so every parameter "
      f"is trained by {who} in weight space. To use G-space, pass structure= (e.g. "
      "gsgd_jax.trace_structure(apply_fn, params, x)); fallback='error' refuses such params.",
      GSpaceWarning, stacklevel=4)
