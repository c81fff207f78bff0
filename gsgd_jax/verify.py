"""Numerical check that a basis-path structure fits the model it will optimize.

G-space rests on one premise: rescaling a hidden unit of a chain (its incoming weights and bias by
``c > 0``, its outgoing weights by ``1 / c``) leaves the network function unchanged. A structure
inferred from parameter names can violate it (a residual connection, a shared layer, a GELU), and
G-SGD on such a structure is neither G-SGD nor invariant. :func:`verify_structure` rescales each
hidden layer of each chain on its own and compares the outputs.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from gsgd_jax._tree import map_with_slices, path_str
from gsgd_jax._warnings import GSpaceWarning
from gsgd_jax.gauge import rescale
from gsgd_jax.structure import BasisPathStructure

__all__ = ["verify_structure"]


def _tolerance(leaves) -> float:
  """``1e-9`` if outputs and params are all float64, else ``10 sqrt(eps)`` of the least precise
  of them, capped at 0.05 (float32: 3.5e-3)."""
  eps = [float(jnp.finfo(x.dtype).eps) for x in leaves if jnp.issubdtype(x.dtype, jnp.floating)]
  eps = max(eps) if eps else float(jnp.finfo(jnp.float32).eps)
  return 1e-9 if eps < 1e-10 else min(10.0 * float(np.sqrt(eps)), 0.05)


def verify_structure(structure: BasisPathStructure, apply_fn: Callable[..., Any], params: Any,
                     *inputs: Any, max_factor: float = 4.0, rtol: float | None = None,
                     seed: int = 0) -> None:
  """Checks that the positive rescaling of every hidden layer of ``structure`` leaves
  ``apply_fn(params, *inputs)`` unchanged; raises a ``ValueError`` where it does not.

  One forward pass, then two per hidden layer of each chain: that layer's units are rescaled by
  random factors (log-uniform in ``[1/max_factor, max_factor]``) and the outputs compared, so the
  error names the chain and the layer where the premise breaks; and, where the output did not
  change, only the weights into those units are scaled, to make sure the output depends on them
  at all. Where it does not (zero weights after them, a zero BatchNorm scale), the rescaling
  test cannot fail, and a :class:`gsgd_jax.GSpaceWarning` says which layers were not tested. Call it once, outside jit, before
  training (``structure`` from :func:`gsgd_jax.infer_structure` or
  :func:`gsgd_jax.trace_structure`).

  Args:
    structure: the structure to check.
    apply_fn: the network as a function ``apply_fn(params, *inputs)`` returning its output (a
      pytree of arrays is fine; return the prediction, not updated BatchNorm statistics).
    params: the params the structure was built for (concrete values).
    *inputs: example inputs, e.g. a batch.
    max_factor: range of the random factors.
    rtol: relative tolerance on ``max |out' - out| / max |out|``; default ``10 * sqrt(eps)`` of
      the least precise dtype of outputs and params (``3.5e-3`` for float32), ``1e-9`` when all
      are float64.
    seed: seed of the random factors.

  Returns:
    ``None``; the check passed when no error is raised.

  Raises:
    ValueError: naming the chain and the kernels around the hidden layer whose rescaling changes
      the output, with the relative change measured.

  Examples:
    >>> import jax.numpy as jnp, gsgd_jax
    >>> params = {'Dense_0': {'kernel': jnp.ones((3, 4))}, 'Dense_1': {'kernel': jnp.ones((4, 2))}}
    >>> f = lambda p, x: jnp.maximum(x @ p['Dense_0']['kernel'], 0) @ p['Dense_1']['kernel']
    >>> s = gsgd_jax.infer_structure(params, skeleton="modulo")
    >>> gsgd_jax.verify_structure(s, f, params, jnp.ones((2, 3)))  # quiet: the premise holds
  """
  structure.check(params)
  out = jax.tree.leaves(apply_fn(params, *inputs))
  tol = _tolerance(out + jax.tree.leaves(params)) if rtol is None else rtol
  scale = max(float(jnp.max(jnp.abs(o))) for o in out) if out else 0.0
  rng = np.random.default_rng(seed)
  untested: list[str] = []
  for ci, chain in enumerate(structure.chains):
    h = chain.widths
    for k in range(1, len(h) - 1):
      factors = [[np.ones(w) for w in c.widths[1:-1]] for c in structure.chains]
      factors[ci][k - 1] = np.exp(rng.uniform(-1.0, 1.0, h[k]) * np.log(max_factor))
      twin = rescale(structure, params, factors)
      new = jax.tree.leaves(apply_fn(twin, *inputs))
      if len(new) != len(out):
        raise ValueError("apply_fn returned a different output structure for rescaled params.")
      err = max((float(jnp.max(jnp.abs(a - b))) for a, b in zip(new, out)), default=0.0)
      if err <= tol * max(scale, 1e-30) and not _sensitive(structure, chain, k, params, apply_fn, inputs,
                                                            factors[ci][k - 1], out, tol, scale):
        untested.append(f"chain {ci}, hidden layer {k} (after "
                        f"{path_str(chain.layers[k - 1].kernel)!r})")
        continue
      if not err <= tol * max(scale, 1e-30):
        before = path_str(chain.layers[k - 1].kernel)
        after = path_str(chain.layers[k].kernel)
        raise ValueError(
            f"The structure does not fit this model: rescaling the hidden units between "
            f"{before!r} and {after!r} (chain {ci}, hidden layer {k}) changes the output by "
            f"{err / max(scale, 1e-30):.2e} (relative; tolerance {tol:.1e}). Something other "
            "than a positively homogeneous function (ReLU, pooling, bias add) connects them, "
            "or they are not consecutive (a skip connection, a shared layer, another "
            "activation). Build the structure with gsgd_jax.trace_structure(apply_fn, params, "
            "x), or list the chains yourself with gsgd_jax.chain_structure.")
  if untested:
    warnings.warn(
        "gsgd_jax.verify_structure could not test " + "; ".join(untested) + ": the output does "
        "not change even when only the weights into those units are scaled (zero weights after "
        "them, a zero normalization scale, dead units on these inputs), so a rescaling cannot "
        "show whether the structure fits there. Check again with other inputs or once those "
        "weights are non-zero.", GSpaceWarning, stacklevel=2)


def _sensitive(structure, chain, k, params, apply_fn, inputs, factors, out, tol, scale) -> bool:
  """Whether scaling only the weights *into* hidden layer ``k`` (not a rescaling) changes the
  output: if not, no rescaling test of that layer can fail."""
  layer = chain.layers[k - 1]
  probe_factors = np.where(np.abs(np.log(factors)) < 0.1, 2.0, factors)  # none close to 1

  def scale_in(path, x):
    if path == layer.kernel or path == layer.bias:
      return x * jnp.asarray(probe_factors, x.dtype)
    return x

  probe = map_with_slices(scale_in, params, structure.stacked)
  new = jax.tree.leaves(apply_fn(probe, *inputs))
  err = max((float(jnp.max(jnp.abs(a - b))) for a, b in zip(new, out)), default=0.0)
  return err > tol * max(scale, 1e-30)
