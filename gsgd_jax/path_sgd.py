"""Path-SGD (Neyshabur, Salakhutdinov & Srebro, NeurIPS 2015) as an optax transform.

Path-SGD is steepest descent with respect to the (squared) l2 path regularizer

    phi(w) = sum over paths p from an input (or bias) unit to an output of prod_{e in p} w_e^2.

Its diagonal approximation rescales each gradient coordinate by

    gamma_e = sum over paths p through e of prod_{e' in p, e' != e} w_e'^2
            = gamma_in(i) * gamma_out(j)        for an edge e = (i -> j),

where ``gamma_in(i)`` sums the products of squared weights over all paths from an input or bias unit
to node ``i`` (a forward pass with squared weights, ``gamma_in = 1`` at the inputs) and
``gamma_out(j)`` sums them over all paths from ``j`` to an output (a backward pass,
``gamma_out = 1`` at the outputs). A bias of node ``j`` is an edge from a constant unit: its
scale is ``gamma_out(j)``. The update ``w <- w - lr * g / gamma`` is invariant under the positive
node rescalings that leave a ReLU network's function unchanged.

Layers are read as kernels of shape ``(T, in, out)``: a Dense kernel has ``T = 1``, a convolution
kernel ``(*taps, in, out)`` has ``T = prod(taps)`` parallel edges between each pair of channels.
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import optax

from gsgd_jax._warnings import GSpaceWarning
from gsgd_jax._tree import leaves_with_paths, path_str, restack
from gsgd_jax._resolve import Resolver, StructureLike, is_concrete

__all__ = [
    "path_sgd_scales",
    "path_norm",
    "scale_by_path_norm",
    "path_sgd",
]


def _forward_backward(kernels: Sequence[jax.Array], biases: Sequence[jax.Array | None]):
  """``gamma_in`` at each node set ``0..L`` and ``gamma_out`` at each node set ``0..L``."""
  if len(kernels) != len(biases):
    raise ValueError(f"Got {len(kernels)} kernels but {len(biases)} biases (use None for none).")
  if not kernels:
    raise ValueError("Need at least one layer.")
  for l, k in enumerate(kernels):
    if k.ndim != 3:
      raise ValueError(f"Kernel {l} has shape {k.shape}; expected (T, in, out).")
    if l and k.shape[1] != kernels[l - 1].shape[2]:
      raise ValueError(f"Kernel {l} has {k.shape[1]} inputs but kernel {l - 1} has "
                       f"{kernels[l - 1].shape[2]} outputs.")
    b = biases[l]
    if b is not None and b.shape != (k.shape[2],):
      raise ValueError(f"Bias {l} has shape {b.shape}; expected ({k.shape[2]},).")
  sq = [jnp.sum(jnp.square(k), axis=0) for k in kernels]  # (in, out): T parallel edges summed
  g_in = [jnp.ones((kernels[0].shape[1],), sq[0].dtype)]
  for l, w2 in enumerate(sq):
    nxt = g_in[-1] @ w2
    if biases[l] is not None:
      nxt = nxt + jnp.square(biases[l]).astype(nxt.dtype)
    g_in.append(nxt)
  g_out = [jnp.ones((kernels[-1].shape[2],), sq[-1].dtype)]
  for w2 in reversed(sq):
    g_out.append(w2 @ g_out[-1])
  return g_in, g_out[::-1]


def path_sgd_scales(kernels: Sequence[jax.Array], biases: Sequence[jax.Array | None]
                    ) -> tuple[list[jax.Array], list[jax.Array | None]]:
  """Path-SGD scaling ``gamma`` of every edge of a chain of layers.

  Args:
    kernels: the chain's kernels in data-flow order, each of shape ``(T, in, out)``.
    biases: one entry per layer: a bias of shape ``(out,)`` or None.

  Returns:
    ``(kernel_scales, bias_scales)``: ``kernel_scales[l][t, i, j] = gamma_in(i) * gamma_out(j)``
    (shape of ``kernels[l]``) and ``bias_scales[l][j] = gamma_out(j)`` (None where there is no
    bias).

  Examples:
    >>> import jax.numpy as jnp
    >>> k, b = path_sgd_scales([jnp.full((1, 2, 3), 2.0), jnp.ones((1, 3, 1))], [None, None])
    >>> k[0][0].tolist()  # gamma_in = 1 at the inputs, gamma_out = 1 through the last layer
    [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
    >>> k[1][0, :, 0].tolist()  # gamma_in of each hidden node: 2 inputs * 2^2
    [8.0, 8.0, 8.0]
  """
  g_in, g_out = _forward_backward(kernels, biases)
  kernel_scales, bias_scales = [], []
  for l, k in enumerate(kernels):
    s = g_in[l][:, None] * g_out[l + 1][None, :]
    kernel_scales.append(jnp.broadcast_to(s[None], k.shape))
    bias_scales.append(None if biases[l] is None else g_out[l + 1])
  return kernel_scales, bias_scales


def path_norm(kernels: Sequence[jax.Array], biases: Sequence[jax.Array | None]) -> jax.Array:
  """The squared l2 path norm: sum over all paths of the product of their squared weights.

  Args:
    kernels: the chain's kernels in data-flow order, each of shape ``(T, in, out)``.
    biases: one entry per layer: a bias of shape ``(out,)`` or None.

  Returns:
    A scalar, invariant under positive node rescaling.
  """
  g_in, _ = _forward_backward(kernels, biases)
  return jnp.sum(g_in[-1])


def _chain_scales(chain: Any, leaves: dict) -> dict:
  """``{path: gamma}`` for every kernel and bias of one chain, read from ``leaves``."""
  kernels, biases = [], []
  for layer in chain.layers:
    for p in (layer.kernel, layer.bias):
      if p is not None and p not in leaves:
        raise ValueError(f"The structure expects parameter {path_str(p)!r} but the params have no "
                         f"such leaf. Known leaves: {sorted(map(path_str, leaves))[:12]}")
    k = leaves[layer.kernel]
    if tuple(k.shape) != tuple(layer.kernel_shape):
      raise ValueError(f"Parameter {path_str(layer.kernel)!r} has shape {tuple(k.shape)} but the "
                       f"structure expects {tuple(layer.kernel_shape)}.")
    kernels.append(jnp.reshape(k, (layer.num_taps, layer.in_dim, layer.out_dim)))
    biases.append(None if layer.bias is None else leaves[layer.bias])
  kscales, bscales = path_sgd_scales(kernels, biases)
  out = {}
  for layer, ks, bs in zip(chain.layers, kscales, bscales):
    out[layer.kernel] = jnp.reshape(ks, layer.kernel_shape)
    if layer.bias is not None:
      out[layer.bias] = bs
  return out


def scale_by_path_norm(structure: StructureLike = None, eps: float = 1e-12
                       ) -> optax.GradientTransformation:
  """Divides each gradient coordinate by its Path-SGD scaling ``gamma`` (computed from params).

  Args:
    structure: a :class:`gsgd_jax.structure.BasisPathStructure` whose chains list the layers, a
      callable building one from the params, or None: inferred from the params with
      :func:`gsgd_jax.structure.infer_structure` (a single Dense/Conv chain, layers in the natural
      order of their names). Resolved once per params layout (treedef, shapes, dtypes). Leaves
      outside the chains pass through unscaled; params without any chain (a plain array, a tree
      without Dense/Conv kernels) pass through entirely, and ``init`` warns once.
    eps: lower bound on ``gamma`` (guards dead units).

  Returns:
    An optax transformation; its ``update`` needs ``params``.
  """
  resolve = Resolver(structure, "gsgd_jax.path_sgd", skeleton_free=True)
  noted = []

  def init_fn(params):
    s = resolve.init(params)
    if is_concrete(params) and not noted and s is not None and not s.chains:
      noted.append(True)
      warnings.warn(
          "gsgd_jax.path_sgd: no chain of Dense/Conv layers in the params (or the structure has "
          "none), so nothing is rescaled: this is plain SGD. Pass structure= to use Path-SGD.",
          GSpaceWarning, stacklevel=3)
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("scale_by_path_norm needs the params: call update(grads, state, params).")
    s = resolve.update(params)
    param_leaves = s.leaves(params)
    scales = {}
    for chain in s.chains:
      scales.update(_chain_scales(chain, param_leaves))
    scales = restack(scales)  # slices of stacked (scanned) layers back into their leaves
    flat, treedef = leaves_with_paths(updates)
    new = []
    for p, g in flat:
      if p in scales:
        gamma = jnp.maximum(scales[p], eps).astype(g.dtype)
        g = g / gamma
      new.append(g)
    return jax.tree_util.tree_unflatten(treedef, new), state

  return optax.GradientTransformation(init_fn, update_fn)


def path_sgd(learning_rate: optax.ScalarOrSchedule, momentum: float | None = None,
             nesterov: bool = False, *, structure: StructureLike = None,
             eps: float = 1e-12) -> optax.GradientTransformationExtraArgs:
  """Path-SGD: ``w <- w - lr * g / gamma`` (optionally with heavy-ball momentum).

  Args:
    learning_rate: a scalar or an optax schedule.
    momentum: momentum decay (as in :func:`optax.sgd`); no momentum if None.
    nesterov: use Nesterov momentum.
    structure: the chains of layers (see :func:`scale_by_path_norm`); inferred if None.
    eps: lower bound on ``gamma``.

  Returns:
    An optax transformation (extra arguments of ``update`` are accepted and ignored); its
    ``update`` needs ``params``.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> params = {'Dense_0': {'kernel': jnp.ones((2, 3))}, 'Dense_1': {'kernel': jnp.ones((3, 1))}}
    >>> opt = path_sgd(0.1)
    >>> state = opt.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = opt.update(grads, state, params)
    >>> [round(u, 6) for u in updates['Dense_1']['kernel'][:, 0].tolist()]  # -lr * g / 2
    [-0.05, -0.05, -0.05]
  """
  return optax.chain(
      scale_by_path_norm(structure, eps=eps),
      optax.trace(decay=momentum, nesterov=nesterov) if momentum is not None else optax.identity(),
      optax.scale_by_learning_rate(learning_rate),
  )
