"""Building a structure from a params pytree: :func:`infer_structure` (one chain read from the
parameter names) and :func:`chain_structure` (chains you list). Tracing the model instead:
:func:`gsgd_jax.trace_structure`."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from gsgd_jax._tree import (Path, StackIndex, as_path, is_slice, leaf_path, leaves_with_paths,
                            natural_key, path_str)
from gsgd_jax.skeleton import with_skeleton
from gsgd_jax.structure import BasisPathStructure, Chain, Layer

__all__ = ["infer_structure", "chain_structure"]


def _layer_groups(tree: Any) -> tuple[list[tuple[Path, Path | None, tuple[int, ...], int | None]],
                                      list[Path]]:
  """Finds ``kernel`` leaves (with a sibling ``bias``) in data-flow (natural) order, each with the
  number of layers it stacks (``nn.scan``/``nnx.scan`` over layers) or ``None``."""
  leaves, _ = leaves_with_paths(tree)
  shapes = {p: tuple(np.shape(x)) for p, x in leaves}
  kernels = [p for p in shapes if p and p[-1] == "kernel"]
  kernels.sort(key=natural_key)
  used = set()
  groups = []
  for k in kernels:
    b = k[:-1] + ("bias",)
    bias = b if b in shapes else None
    shape = shapes[k]
    stack = None
    if bias is not None and len(shapes[bias]) == 2 and len(shape) >= 3 and (
        shapes[bias] == (shape[0], shape[-1])):
      stack = shape[0]  # (n, *kernel) with bias (n, out): n layers scanned over their first axis
    elif bias is not None and len(shapes[bias]) != 1:
      raise ValueError(
          f"Parameter {path_str(bias)!r} has shape {shapes[bias]} and its kernel {shape}: "
          "neither one layer nor a stack of layers (nn.scan / nnx.scan puts the layer axis "
          "first). Build the structure by tracing the model: "
          "gsgd_jax.trace_structure(apply_fn, params, x).")
    elif bias is None and len(shape) >= 3 and not any("conv" in str(part).lower() for part in k):
      raise ValueError(
          f"Kernel {path_str(k)!r} of shape {shape} has no bias and no 'conv' in its name: it may "
          f"be a convolution ({shape[-2]} -> {shape[-1]} channels, taps {shape[:-2]}) or a stack "
          f"of {shape[0]} layers made with nn.scan / nnx.scan, and names cannot tell. Build the "
          "structure by tracing the model, which reads both: "
          "gsgd_jax.trace_structure(apply_fn, params, x) (or list the layers with "
          "gsgd_jax.chain_structure: a stacked layer i is 'path/kernel[i]').")
    groups.append((k, bias, shape, stack))
    used.add(k)
    if bias is not None:
      used.add(bias)
  rest = [p for p in shapes if p not in used]
  return groups, rest


def _auto_layer(path: Path, bias: Path | None, shape: tuple[int, ...], prev_out: int | None) -> Layer:
  if len(shape) == 2:
    if prev_out is not None and shape[0] != prev_out and shape[0] % prev_out == 0:
      # Dense after a flattened (positions, channels) feature map: positions act as taps.
      return Layer(path, bias, shape, (shape[0] // prev_out,))
    return Layer(path, bias, shape, ())
  if len(shape) >= 3:
    return Layer(path, bias, shape, tuple(shape[:-2]))
  raise ValueError(f"Unsupported kernel {path_str(path)!r} of shape {shape}: G-space needs Dense "
                   "(in, out) or Conv (*taps, in, out) kernels.")


def infer_structure(params: Any, skeleton: str = "aligned") -> BasisPathStructure:
  """Infers a single chain from the ``kernel``/``bias`` leaves of ``params``.

  Works for linen ``variables['params']``, ``nnx.state(model, nnx.Param)`` (wrapped or not) and
  plain nested dicts. Layers are ordered by data flow as names encode it: natural order of their
  paths (``Dense_2`` before ``Dense_10``; nnx ``layers/2`` before ``layers/10``). A stack of
  layers made with ``nn.scan``/``nnx.scan`` (kernel ``(n, *kernel)`` with bias ``(n, out)``) gives
  ``n`` layers, slice after slice; a kernel of rank 3 or more without a bias is read as a
  convolution only when its path names one (``conv``), and refused otherwise. A Dense layer
  after convolutions continues the chain either after global pooling (``in == channels``) or after
  flattening (``in == positions * channels``; positions act as taps). Leaves that are not kernels
  or biases (normalization scales, embeddings, ...) go to the fallback.

  For networks that are not one chain (residual nets, several heads), use
  :func:`gsgd_jax.trace_structure` or :func:`chain_structure`.

  Args:
    params: the params pytree.
    skeleton: ``"aligned"`` (default): the skeleton is chosen from the weights of ``params``
      (:func:`align_skeleton`; needs concrete arrays); ``"modulo"``: the ``j mod h`` convention
      on unit indices (only paths and shapes are read).

  Returns:
    The structure: one chain, every other leaf in the fallback.

  Raises:
    ValueError: if the kernels do not chain, naming the two layers.

  Examples:
    >>> import jax.numpy as jnp
    >>> params = {'Dense_0': {'kernel': jnp.ones((3, 4)), 'bias': jnp.zeros(4)},
    ...           'Dense_1': {'kernel': jnp.ones((4, 2))}}
    >>> s = infer_structure(params, skeleton="modulo")
    >>> s.chains[0].widths, s.num_basis_paths
    ((3, 4, 2), 20)
  """
  groups, rest = _layer_groups(params)
  if not groups:
    raise ValueError("No `kernel` leaves found in the params: nothing to optimize in G-space. "
                     "Pass an explicit structure (gsgd_jax.chain_structure) or use a plain optimizer.")
  layers = []
  prev_out = None
  for k, b, shape, stack in groups:
    if stack is None:
      layers.append(_auto_layer(k, b, shape, prev_out))
    else:  # one layer per slice, in stack order
      for i in range(stack):
        at = (StackIndex(i),)
        layers.append(_auto_layer(k + at, b + at, shape[1:], prev_out))
    prev_out = shape[-1]
  chain = Chain(tuple(layers))
  notes = tuple((p, "not a kernel or bias of a chained layer") for p in rest)
  return with_skeleton(BasisPathStructure((chain,), tuple(rest), notes), params, skeleton)


def _kernel_at(p: Path, shapes: dict[Path, tuple[int, ...]]):
  """The shape of kernel ``p`` (a leaf, or a slice ``leaf[i]`` of a stacked leaf) and the path of
  its bias (the sibling ``bias`` leaf, sliced alike), or ``None``."""
  base = leaf_path(p)
  if base not in shapes:
    raise ValueError(f"Kernel {path_str(base)!r} is not in the params. "
                     f"Known leaves: {sorted(map(path_str, shapes))}")
  shape = shapes[base]
  b = base[:-1] + ("bias",) if base[-1] == "kernel" else None
  if is_slice(p):
    if len(shape) < 3 or not 0 <= p[-1].index < shape[0]:
      raise ValueError(f"{path_str(p)!r} is not a slice of {path_str(base)!r} (shape {shape}): "
                       "a stacked leaf of n layers has shape (n, *kernel_shape), slices 0..n-1.")
    if b is not None and b in shapes and len(shapes[b]) != 2:
      b = None
    return shape[1:], (b + p[-1:] if b is not None and b in shapes else None)
  return shape, (b if b in shapes else None)


def chain_structure(params: Any, chains: Sequence[Sequence[Any]],
                    skeleton: str = "aligned") -> BasisPathStructure:
  """Builds a structure from kernel paths you list, chain by chain, in data-flow order.

  Args:
    params: the params pytree (only paths and shapes are read).
    chains: for each chain, its layers in data-flow order. A layer is a kernel path
      (``'block/conv1/kernel'`` or a tuple of keys), or a ``(kernel_path, taps_shape)`` pair for a
      Dense layer fed by a flattened feature map with spatial shape ``taps_shape``. A sibling
      ``bias`` leaf is picked up automatically.
    skeleton: ``"aligned"`` or ``"modulo"``, see :func:`infer_structure`.

  Returns:
    The structure; every other leaf goes to the fallback.

  Examples:
    >>> import jax.numpy as jnp
    >>> params = {'a': {'kernel': jnp.ones((3, 4))}, 'b': {'kernel': jnp.ones((4, 2))},
    ...           'scale': jnp.ones(2)}
    >>> s = chain_structure(params, [['a/kernel', 'b/kernel']], skeleton="modulo")
    >>> [''.join(p) for p in s.fallback]
    ['scale']
  """
  leaves, _ = leaves_with_paths(params)
  shapes = {p: tuple(np.shape(x)) for p, x in leaves}
  built = []
  for spec in chains:
    layers = []
    for item in spec:
      taps = None
      if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], tuple) and (
          not item[1] or isinstance(item[1][0], int)) and not isinstance(item[0], int):
        item, taps = item
      p = as_path(item)
      shape, bias = _kernel_at(p, shapes)
      if taps is None:
        taps = tuple(shape[:-2]) if len(shape) >= 3 else ()
      layers.append(Layer(p, bias, shape, tuple(taps)))
    built.append(Chain(tuple(layers)))
  structure = BasisPathStructure(tuple(built))
  rest = tuple(p for p in shapes if p not in structure.gspace_paths)
  structure = dataclasses.replace(structure, fallback=rest,
                                  notes=tuple((p, "not listed in any chain") for p in rest))
  return with_skeleton(structure, params, skeleton)
