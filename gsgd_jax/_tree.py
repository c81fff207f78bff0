"""Pytree helpers: canonical parameter paths that work for linen, nnx and plain dicts."""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Hashable, Sequence

import jax
import numpy as np

# A canonical parameter path: the sequence of dict keys / attribute names / sequence indices
# that lead to a leaf, with the trailing ``.value`` of an ``nnx.Variable`` removed, so that
# linen ``params``, ``nnx.state(model, nnx.Param)`` (wrapped or not) and plain dicts agree.
Path = tuple[Hashable, ...]


@dataclasses.dataclass(frozen=True)
class StackIndex:
  """The last element of the path of one slice of a stacked leaf: layer ``index`` of a stack.

  ``flax.linen.scan`` and ``nnx.scan`` over layers keep the kernels of ``n`` layers in one leaf
  of shape ``(n, *kernel_shape)``; the structure addresses layer ``i`` as ``leaf_path +
  (StackIndex(i),)``, written ``'.../kernel[i]'``.
  """

  index: int

  def __str__(self) -> str:
    return f"[{self.index}]"


def is_slice(path: Path) -> bool:
  """``path`` addresses one slice of a stacked leaf (ends with a :class:`StackIndex`)."""
  return bool(path) and isinstance(path[-1], StackIndex)


def leaf_path(path: Path) -> Path:
  """The path of the leaf that holds ``path``: itself, or the stacked leaf of a slice."""
  return path[:-1] if is_slice(path) else path


def slice_leaf(x: Any, index: int) -> Any:
  """Slice ``index`` of a stacked leaf (arrays; a ``jax.ShapeDtypeStruct`` gives one too)."""
  if isinstance(x, jax.ShapeDtypeStruct) or not hasattr(x, "__getitem__"):
    return jax.ShapeDtypeStruct(tuple(np.shape(x))[1:], x.dtype)
  return x[index]


def _key_name(key: Any) -> Hashable:
  if isinstance(key, jax.tree_util.DictKey):
    return key.key
  if isinstance(key, jax.tree_util.SequenceKey):
    return key.idx
  if isinstance(key, jax.tree_util.GetAttrKey):
    return key.name
  if isinstance(key, jax.tree_util.FlattenedIndexKey):
    return key.key
  return str(key)


def canonical_path(keypath: Sequence[Any]) -> Path:
  """Turns a JAX key path into a canonical tuple of names (``.value`` of nnx stripped)."""
  names = tuple(_key_name(k) for k in keypath)
  if names and names[-1] == "value" and isinstance(keypath[-1], jax.tree_util.GetAttrKey):
    names = names[:-1]
  return names


def path_str(path: Path) -> str:
  """``('Dense_0', 'kernel')`` -> ``'Dense_0/kernel'``; a slice: ``'stack/Dense_0/kernel[2]'``."""
  if is_slice(path):
    return path_str(path[:-1]) + str(path[-1])
  return "/".join(str(p) for p in path)


_SLICE = re.compile(r"^(.*)\[(\d+)\]$")


def as_path(path: str | Sequence[Hashable]) -> Path:
  """Accepts ``'a/b/kernel'`` (``'a/kernel[2]'``: slice 2 of a stacked leaf) or a tuple of keys;
  returns a canonical tuple."""
  if isinstance(path, str):
    m = _SLICE.match(path)
    if m:
      return as_path(m.group(1)) + (StackIndex(int(m.group(2))),)
    out = []
    for part in path.split("/"):
      out.append(int(part) if part.isdigit() else part)
    return tuple(out)
  return tuple(path)


def leaves_with_paths(tree: Any) -> tuple[list[tuple[Path, Any]], Any]:
  """Flattens ``tree`` into ``[(canonical_path, array_leaf)]`` and its treedef.

  nnx ``Param`` wrappers are looked through, so wrapped and unwrapped states give the same paths.
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
  return [(canonical_path(kp), leaf) for kp, leaf in flat], treedef


def natural_key(path: Path) -> tuple:
  """Sort key that orders ``Dense_2`` before ``Dense_10`` and ``layers/2`` before ``layers/10``."""
  out = []
  for part in path:
    if isinstance(part, StackIndex):
      out.append((0, "", part.index))
      continue
    if isinstance(part, int):
      out.append((0, "", part))
      continue
    for chunk in re.split(r"(\d+)", str(part)):
      if not chunk:
        continue
      out.append((0, "", int(chunk)) if chunk.isdigit() else (1, chunk, 0))
  return tuple(out)


def map_with_paths(fn: Callable[[Path, Any], Any], tree: Any, *rest: Any) -> Any:
  """``jax.tree.map`` whose function also receives the canonical path of each leaf."""
  return jax.tree_util.tree_map_with_path(lambda kp, x, *r: fn(canonical_path(kp), x, *r), tree, *rest)


def map_with_slices(fn: Callable[[Path, Any], Any], tree: Any, stacked: frozenset[Path]) -> Any:
  """:func:`map_with_paths`, with ``fn`` applied to each slice of the leaves in ``stacked``.

  A leaf at a path of ``stacked`` (shape ``(n, ...)``) gives ``stack([fn(path + (StackIndex(i),),
  leaf[i]) for i < n])``; every other leaf ``fn(path, leaf)``.
  """
  def each(path, x):
    if path not in stacked:
      return fn(path, x)
    n = np.shape(x)[0]
    return jax.numpy.stack([fn(path + (StackIndex(i),), slice_leaf(x, i)) for i in range(n)])
  return map_with_paths(each, tree)


def with_slices(leaves: dict[Path, Any], slices: Sequence[Path]) -> dict[Path, Any]:
  """``leaves`` plus the entries of the slice paths ``slices`` (views of their stacked leaves)."""
  out = dict(leaves)
  for p in slices:
    out[p] = slice_leaf(leaves[p[:-1]], p[-1].index)
  return out


def restack(new: dict[Path, Any]) -> dict[Path, Any]:
  """Entries of slice paths stacked into their leaves (all slices of a leaf must be present)."""
  if not any(is_slice(p) for p in new):
    return new
  out, groups = {}, {}
  for p, x in new.items():
    if is_slice(p):
      groups.setdefault(p[:-1], {})[p[-1].index] = x
    else:
      out[p] = x
  for base, parts in groups.items():
    out[base] = jax.numpy.stack([parts[i] for i in range(len(parts))])
  return out
