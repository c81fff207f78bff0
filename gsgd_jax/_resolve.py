"""Which structure a transform uses, and the guard that ties an optimizer state to its skeleton.

Shared by the optax transforms (``transform.py``) and Path-SGD (``path_sgd.py``).

``structure=None`` (the bare ``gsgd(lr)``) means: the structure ``infer_structure(params)``
builds at ``tx.init`` from the concrete initial params, skeleton aligned to them, once per params
layout; the update reuses it. ``init`` on abstract values (under ``jit`` or ``eval_shape``)
cannot choose a skeleton and raises an error that names the call to make instead.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from gsgd_jax import _json
from gsgd_jax._tree import leaves_with_paths
from gsgd_jax.builders import infer_structure
from gsgd_jax.structure import BasisPathStructure

StructureLike = BasisPathStructure | Callable[[Any], BasisPathStructure] | None

NO_KERNEL_NOTE = "no Dense/Conv `kernel` leaf in the params: nothing in G-space"

BUILD_IT = ("structure = gsgd_jax.trace_structure(apply_fn, params, x) (any model; nnx: "
            "gsgd_jax.trace_nnx_structure(model, x)) or gsgd_jax.infer_structure(params) (a "
            "plain Dense/Conv chain), then pass structure=structure")


def layout(tree: Any) -> tuple:
  """Hashable key of a tree's layout: its treedef and each leaf's shape and dtype."""
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  return treedef, tuple(
      (tuple(x.shape) if hasattr(x, "shape") else None, getattr(x, "dtype", None))
      for x in leaves)


def is_concrete(tree: Any) -> bool:
  """Every leaf is a concrete array (not a tracer, not a shape placeholder)."""
  leaves = jax.tree_util.tree_leaves(tree)
  return bool(leaves) and all(
      isinstance(x, (np.ndarray, jax.Array)) and not isinstance(x, jax.core.Tracer) for x in leaves)


def has_arrays(tree: Any) -> bool:
  """Every leaf has a shape and a dtype (arrays, tracers, ``ShapeDtypeStruct``)."""
  leaves = jax.tree_util.tree_leaves(tree)
  return bool(leaves) and all(hasattr(x, "shape") and hasattr(x, "dtype") for x in leaves)


def _kernel_free(tree: Any) -> BasisPathStructure | None:
  """The empty structure (every leaf in the fallback) of a tree without ``kernel`` leaves."""
  paths = [p for p, _ in leaves_with_paths(tree)[0]]
  if any(p and p[-1] == "kernel" for p in paths):
    return None
  return BasisPathStructure(chains=(), fallback=tuple(paths),
                            notes=tuple((p, NO_KERNEL_NOTE) for p in paths))


def _from_names(tree: Any, owner: str, skeleton: str) -> BasisPathStructure:
  try:
    return infer_structure(tree, skeleton=skeleton)
  except ValueError as e:
    raise ValueError(
        f"{owner} without structure= reads one chain of Dense/Conv layers from the parameter "
        f"names, and these params are not one: {e} Build the structure from the model instead: "
        f"{BUILD_IT}.") from None


class Resolver:
  """The structure of one transform instance, resolved once per params layout.

  A :class:`BasisPathStructure` is used as is. A callable is called once per layout (treedef,
  leaf shapes and dtypes). ``None`` is ``infer_structure(params)`` on the concrete params of the
  latest ``init`` of that layout (a new ``init`` with other values aligns the skeleton again; a
  state from an earlier ``init`` is then refused by its fingerprint), or names and shapes only
  with ``skeleton_free``. ``update`` reuses the structure of its layout.

  Args:
    structure: a structure, a callable building one from the params, or ``None``.
    owner: how the transform is named in messages (``"gsgd(lr)"``).
    skeleton_free: the transform does not depend on the skeleton (Path-SGD): ``None`` is
      inferred from names and shapes (modulo skeleton) wherever it is needed, tracers included.
  """

  _MAX = 32  # layouts kept per transform (a transform rarely sees more than two)

  def __init__(self, structure: StructureLike, owner: str, skeleton_free: bool = False):
    if structure is not None and not isinstance(structure, BasisPathStructure) and not callable(
        structure):
      raise TypeError("structure must be a gsgd_jax.BasisPathStructure, a callable building one "
                      f"from the params, or None; got {type(structure).__name__}.")
    self.structure = structure
    self.owner = owner
    self.skeleton_free = skeleton_free
    self._cache: dict[tuple, BasisPathStructure] = {}
    self._seen: dict[tuple, tuple[int, ...]] = {}  # ids of the leaves of the latest init

  @property
  def inferred(self) -> bool:
    return self.structure is None

  def _remember(self, key, s):
    if not isinstance(s, BasisPathStructure):
      raise TypeError(f"The structure callable returned a {type(s).__name__}, not a "
                      "gsgd_jax.BasisPathStructure.")
    if len(self._cache) >= self._MAX:
      self._cache.pop(next(iter(self._cache)))
    self._cache[key] = s
    return s

  def init(self, params: Any) -> BasisPathStructure | None:
    """The structure for ``params`` at ``tx.init``; ``None`` for placeholder params."""
    if isinstance(self.structure, BasisPathStructure):
      return self.structure
    if not has_arrays(params):  # optax.tree.map_params: no shapes, no values
      return None
    key = layout(params)
    values = tuple(map(id, jax.tree_util.tree_leaves(params)))
    if key in self._cache and (self.structure is not None or self.skeleton_free
                               or self._seen.get(key) == values):
      return self._cache[key]
    if self.structure is not None:
      return self._remember(key, self.structure(params))
    # None: the skeleton is aligned to the params of the latest init (the same arrays seen by
    # the several blocks of one tx.init are aligned once)
    self._seen[key] = values
    s = _kernel_free(params)
    if s is None:
      if self.skeleton_free:
        s = _from_names(params, self.owner, "modulo")
      elif not is_concrete(params):
        kind = next(type(x).__name__ for x in jax.tree_util.tree_leaves(params)
                    if not isinstance(x, (np.ndarray, jax.Array))
                    or isinstance(x, jax.core.Tracer))
        raise ValueError(
            f"{self.owner} without structure= chooses its skeleton from the parameter values at "
            f"tx.init, but tx.init got abstract values ({kind}: under jax.jit or "
            "jax.eval_shape). Call tx.init outside jit on the initialized params, or build the "
            f"structure first: {BUILD_IT}.")
      else:
        s = _from_names(params, self.owner, "aligned")
    return self._remember(key, s)

  def update(self, params: Any) -> BasisPathStructure:
    """The structure for ``params`` at ``tx.update`` (the one ``init`` built)."""
    if isinstance(self.structure, BasisPathStructure):
      return self.structure
    key = layout(params)
    if key in self._cache:
      return self._cache[key]
    if self.structure is not None:  # a callable: called once per layout, wherever first needed
      return self._remember(key, self.structure(params))
    s = _kernel_free(params)
    if s is None and self.skeleton_free:
      s = _from_names(params, self.owner, "modulo")
    if s is None:
      raise ValueError(
          f"{self.owner} without structure= builds its structure at tx.init from the initial "
          "params, and this transform has not been initialized with params of this layout (a "
          "transform re-created at every update, as optax.inject_hyperparams does, never is). "
          f"Build it once: {BUILD_IT}.")
    return self._remember(key, s)


# ------------------------------------------------------------------------------------------------
# The skeleton an optimizer state belongs to
# ------------------------------------------------------------------------------------------------

UNKNOWN_SKELETON = -1  # state built from placeholder params (no structure known)


def skeleton_id(structure: BasisPathStructure | None) -> jax.Array:
  """The int32 scalar a state stores: the structure's fingerprint (``-1``: none known)."""
  return jnp.asarray(UNKNOWN_SKELETON if structure is None else _json.fingerprint(structure),
                     jnp.int32)


def mismatch_message(owner: str, stored: int, structure: BasisPathStructure) -> str:
  return (
      f"{owner}: the optimizer state was built for another basis-path structure (skeleton "
      f"fingerprint {stored}; the structure in use has {_json.fingerprint(structure)}), so its "
      "path-space buffers (momentum, Adam moments) would be read in another basis. This happens "
      "when a run is resumed with a structure rebuilt from trained weights (its aligned skeleton "
      "is chosen again). Save the structure with the checkpoint, structure.to_json(), and resume "
      "with structure=gsgd_jax.BasisPathStructure.from_json(text) (a transform built without "
      "structure= chose its skeleton from the params given to tx.init: for a run you will "
      "resume, build the structure explicitly with gsgd_jax.infer_structure(params) or "
      "gsgd_jax.trace_structure and save it). Inside jit this check makes the update NaN "
      "instead of raising.")


def guard(structure: BasisPathStructure, stored: Any, owner: str, tree: Any) -> Any:
  """``tree`` if ``stored`` is ``structure``'s fingerprint; raises (concrete ``stored``) or
  returns ``tree`` full of NaN (traced ``stored``) otherwise."""
  fp = _json.fingerprint(structure)
  if not isinstance(stored, jax.core.Tracer):
    value = int(np.asarray(stored))
    if value != fp:
      raise ValueError(mismatch_message(owner, value, structure))
    return tree
  ok = stored == fp
  return jax.tree.map(lambda x: jnp.where(ok, x, jnp.asarray(jnp.nan, x.dtype)), tree)
