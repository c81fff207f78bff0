"""Pytree helpers: canonical parameter paths that work for linen, nnx and plain dicts."""

from __future__ import annotations

import re
from typing import Any, Callable, Hashable, Sequence

import jax

# A canonical parameter path: the sequence of dict keys / attribute names / sequence indices
# that lead to a leaf, with the trailing ``.value`` of an ``nnx.Variable`` removed, so that
# linen ``params``, ``nnx.state(model, nnx.Param)`` (wrapped or not) and plain dicts agree.
Path = tuple[Hashable, ...]


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
  """``('Dense_0', 'kernel')`` -> ``'Dense_0/kernel'``."""
  return "/".join(str(p) for p in path)


def as_path(path: str | Sequence[Hashable]) -> Path:
  """Accepts ``'a/b/kernel'`` or a tuple of keys; returns a canonical tuple."""
  if isinstance(path, str):
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
