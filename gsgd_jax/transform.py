"""Optax transformations for G-space: inverse chain rule, weight allocation, G-SGD, G-space Adam.

The G-space update is ``chain(to_path_gradients, <any optax transform>, allocate_path_updates)``:

1. :func:`to_path_gradients` turns ``dL/dw`` into ``dL/dv`` for every basis path (inverse chain rule),
   laid out like the params;
2. any optax transform (momentum, Adam, clipping, schedules) runs on ``dL/dv`` and produces a
   path-space update ``dv``;
3. :func:`allocate_path_updates` turns ``dv`` into the exact weight update (weight allocation).

Leaves outside G-space (normalization scales, embeddings, shortcut convolutions, ...) pass
through steps 1 and 3 unchanged, so by default step 2 trains them with the same optimizer in
weight space. Pass ``fallback=`` to train them with another transform instead.
"""

from __future__ import annotations

import re
import warnings
from typing import Any, Callable, Literal, NamedTuple

import jax
import numpy as np
import optax
from jax.experimental.shard_alike import shard_alike

from gsgd_jax import pathspace
from gsgd_jax._defaults import MIN_RATIO
from gsgd_jax._tree import leaves_with_paths, map_with_paths, path_str
from gsgd_jax.structure import BasisPathStructure, infer_structure, skeleton_mask

__all__ = [
    "to_path_gradients",
    "allocate_path_updates",
    "g_space",
    "gsgd",
    "gsgd_adam",
    "GSpaceState",
    "check_params",
    "check_gradients",
]

StructureLike = BasisPathStructure | Callable[[Any], BasisPathStructure] | None
Fallback = optax.GradientTransformation | Literal["error"] | None
BnScaling = Literal["weight", "noweight"] | None
BN_SCALINGS = pathspace.BN_SCALINGS  # ("weight", "noweight", None)
_check_bn_scaling = pathspace._check_bn_scaling  # one message for the transforms and pathspace

_NO_KERNEL_NOTE = "no Dense/Conv `kernel` leaf in the params: nothing in G-space"


def _infer(tree: Any) -> BasisPathStructure:
  """``infer_structure(tree, skeleton="modulo")`` (names and shapes only: works on tracers); a
  tree without any ``kernel`` leaf (a plain array, a dict of arrays) gives a structure with no
  chain, every leaf in the fallback."""
  paths = [p for p, _ in leaves_with_paths(tree)[0]]
  if not any(p and p[-1] == "kernel" for p in paths):
    return BasisPathStructure(chains=(), fallback=tuple(paths),
                              notes=tuple((p, _NO_KERNEL_NOTE) for p in paths))
  return infer_structure(tree, skeleton="modulo")


def _layout(tree: Any) -> tuple:
  """Hashable key of a tree's layout: its treedef and each leaf's shape and dtype."""
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  return treedef, tuple(
      (tuple(x.shape) if hasattr(x, "shape") else None, getattr(x, "dtype", None))
      for x in leaves)


class _Resolver:
  """The structure of one transform, resolved once per params layout.

  A given :class:`BasisPathStructure` is returned as is; ``None`` (inferred from names and shapes)
  and a callable are evaluated once per layout (treedef, leaf shapes and dtypes) and cached in
  this transform instance, so the update does not rebuild the structure at every step and a
  callable is called once per layout (the first time: at ``init`` with concrete params, usually).
  """

  _MAX = 32  # layouts kept per transform (a transform rarely sees more than two)

  def __init__(self, structure: StructureLike):
    if structure is not None and not isinstance(structure, BasisPathStructure) and not callable(
        structure):
      raise TypeError("structure must be a gsgd_jax.BasisPathStructure, a callable building one "
                      f"from the params, or None; got {type(structure).__name__}.")
    self.structure = structure
    self.cache: dict[tuple, BasisPathStructure] = {}

  def __call__(self, tree: Any) -> BasisPathStructure:
    if isinstance(self.structure, BasisPathStructure):
      return self.structure
    key = _layout(tree)
    s = self.cache.get(key)
    if s is None:
      s = _infer(tree) if self.structure is None else self.structure(tree)
      if not isinstance(s, BasisPathStructure):
        raise TypeError(f"The structure callable returned a {type(s).__name__}, not a "
                        "gsgd_jax.BasisPathStructure.")
      if len(self.cache) >= self._MAX:
        self.cache.pop(next(iter(self.cache)))
      self.cache[key] = s
    return s


def _is_concrete(tree: Any) -> bool:
  leaves = jax.tree_util.tree_leaves(tree)
  return bool(leaves) and all(
      isinstance(x, (np.ndarray, jax.Array)) and not isinstance(x, jax.core.Tracer) for x in leaves)


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
           "balance=1.0, or start from gsgd_jax.reset_skeleton(structure, params).")
  warnings.warn(
      f"Skeleton-only basis paths have values as small as {smallest:.2e} (stored at "
      f"{path_str(where)}, {'modulo' if fix.startswith('Choose') else 'aligned'} skeleton): "
      f"G-space steps scale like 1 / v^2 there and can be huge. {fix}", UserWarning, stacklevel=4)


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
      f"{chains} (modulo skeleton). Names cannot show skip connections, shared layers or "
      "non-ReLU activations. Build it from the model instead: structure = "
      "gsgd_jax.trace_structure(apply_fn, params, x) (nnx: gsgd_jax.trace_nnx_structure(model, "
      "x)), or check an inferred one with gsgd_jax.verify_structure(structure, apply_fn, params, "
      "x), and pass structure=structure (its skeleton is then aligned to the weights).",
      UserWarning, stacklevel=4)


def _note_nothing_in_gspace(s: BasisPathStructure, inferred: bool, fallback: Fallback) -> None:
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
      UserWarning, stacklevel=4)


def _params_check(resolve: _Resolver, fallback: Fallback) -> Callable[[Any], None]:
  """The check run by ``init``: when the params are concrete arrays, validates them
  (:func:`check_params`) and says once per transform which chain ``structure=None`` inferred, or
  that nothing is in G-space (``fallback='error'`` raises then)."""
  noted = []

  def check(params) -> None:
    if not _is_concrete(params):
      return
    s = resolve(params)
    inferred = resolve.structure is None
    if not s.chains:
      if fallback == "error":
        what = ("no Dense/Conv kernel in the params" if inferred
                else "the structure has no chain")
        leaves = ", ".join(path_str(p) or "<the array>" for p in s.fallback[:8])
        raise ValueError(
            "G-space was demanded for every parameter (fallback='error') but nothing is in "
            f"G-space: {what} (leaves: {leaves}{', ...' if len(s.fallback) > 8 else ''}). "
            "Pass fallback=None to train them in weight space, or a structure with chains.")
      if not noted:
        noted.append(True)
        _note_nothing_in_gspace(s, inferred, fallback)
      return
    if inferred and not noted:
      noted.append(True)
      _note_inferred(s)
    if fallback == "error" and s.fallback:
      raise ValueError(
          "G-space was demanded for every parameter (fallback='error') but these are outside "
          f"it: {', '.join(path_str(p) for p in s.fallback)}. Pass fallback=None (train them "
          "with the same optimizer in weight space) or an optax transform.")
    check_params(s, params)

  return check


# JAX versions (major, minor) on which the uncached shard_alike lowering was verified with
# tests/_sharded_check.py (the bug it works around reproduces there without it).
SHARD_ALIKE_VERIFIED = ((0, 10),)
_shard_alike_checked = False


def _jax_version(version: str) -> tuple[int, int]:
  """``"0.10.2.dev1"`` -> ``(0, 10)``; ``"1.0rc1"`` -> ``(1, 0)``."""
  parts = [int(m.group()) if (m := re.match(r"\d+", part)) else 0
           for part in version.split(".")[:2]]
  return tuple(parts + [0] * (2 - len(parts)))


def _uncached_shard_alike_lowering() -> None:
  """Lowers every ``shard_alike`` on its own.

  JAX (0.10) caches the lowering of equations with equal primitive, avals and params, so
  ``shard_alike`` calls on two same-shaped pairs reuse one sharding-group id and XLA forces the
  two pairs to one sharding (e.g. a replicated bias takes the sharding of a split one of the same
  length). Registering the lowering as uncacheable gives each call its own group.
  """
  from jax._src import shard_alike as _sa
  from jax.interpreters import mlir
  mlir.register_lowering(_sa.shard_alike_p, _sa.shard_alike_lowering, cacheable=False)


def _shard_alike_workaround() -> None:
  """Applies :func:`_uncached_shard_alike_lowering` once per process, on verified JAX versions.

  Called the first time a G-space transform emits ``shard_alike`` (inside jit) while JAX sees
  more than one device: with one device nothing can be sharded and the bug cannot show, so
  single-device programs never touch JAX's lowering registry. Other JAX versions: a warning, once.
  """
  global _shard_alike_checked
  if _shard_alike_checked:
    return
  _shard_alike_checked = True
  if _jax_version(jax.__version__) not in SHARD_ALIKE_VERIFIED:
    verified = ", ".join(f"{a}.{b}" for a, b in SHARD_ALIKE_VERIFIED)
    warnings.warn(
        f"gsgd_jax: the shard_alike lowering workaround was verified on JAX {verified} only and "
        f"is not applied on JAX {jax.__version__}. If this JAX still caches shard_alike lowerings, "
        "optimizer updates and state of same-shaped parameters with different shardings (e.g. a "
        "replicated bias and a split one of the same length) may be forced to one sharding: the "
        "values are right, but outputs may not keep the params' shardings (extra communication, "
        "a recompilation of the train step). tests/_sharded_check.py checks this.",
        UserWarning, stacklevel=2)
    return
  try:
    _uncached_shard_alike_lowering()
  except (ImportError, AttributeError, TypeError) as e:  # private API moved: keep JAX's lowering
    warnings.warn(f"gsgd_jax: could not apply the shard_alike lowering workaround ({e!r}); "
                  "shardings of same-shaped parameters may be merged.", UserWarning, stacklevel=2)


def _tie_leaf(p, x):
  if x is None or p is None or getattr(p, "shape", None) != getattr(x, "shape", None):
    return x
  if isinstance(p, jax.core.Tracer) or isinstance(x, jax.core.Tracer):
    if not _shard_alike_checked and jax.device_count() > 1:
      _shard_alike_workaround()
    return shard_alike(p, x)[1]
  if isinstance(p, jax.Array) and isinstance(x, jax.Array) and not x.sharding.is_equivalent_to(
      p.sharding, x.ndim):
    return jax.device_put(x, p.sharding)
  return x


def _like_params(tree: Any, params: Any) -> Any:
  """Every params-shaped subtree of ``tree`` (updates, momentum, Adam moments) sharded like
  ``params``, leaf by leaf: inside jit ``shard_alike`` ties it to the parameter in XLA's sharding
  propagation; outside jit it is moved to the parameter's sharding. No-op on one device."""
  if params is None:
    return tree
  pdef = jax.tree.structure(params)
  is_params = lambda n: jax.tree.structure(n) == pdef  # noqa: E731

  def tie(node):
    if not is_params(node):
      return node
    return jax.tree.map(_tie_leaf, params, node)

  return jax.tree.map(tie, tree, is_leaf=is_params)


def _params_sharded(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
  """``inner`` whose updates and params-shaped state keep the params' shardings."""
  inner = optax.with_extra_args_support(inner)

  def update_fn(updates, state, params=None, **extra_args):
    updates, state = inner.update(updates, state, params, **extra_args)
    return _like_params(updates, params), _like_params(state, params)

  return optax.GradientTransformationExtraArgs(inner.init, update_fn)


def _stateless_with_params(name: str, fn, structure: StructureLike
                           ) -> optax.GradientTransformationExtraArgs:
  """A stateless transform ``updates -> fn(structure, updates, params)`` that requires params."""
  resolve = _Resolver(structure)

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError(f"{name} needs the current params: call tx.update(grads, state, params).")
    return _like_params(fn(resolve(params), updates, params), params), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def to_path_gradients(structure: StructureLike = None, weight_decay: Any = None, *,
                      bn_scaling: BnScaling = "weight") -> optax.GradientTransformationExtraArgs:
  """Inverse chain rule: maps weight gradients ``dL/dw`` to basis-path gradients ``dL/dv``.

  Non-skeleton weight ``e = (i -> j)``: ``dL/dv_e = g_e / (B(i) F(j))``; bias: ``g_b / F(j)``;
  skeleton-only path ``s``: ``dL/dv_s = (x_r - sum of x_e over the other basis paths through r) /
  v_s`` with ``x = w * g`` and ``r`` its designated edge. ``O(m)``, no extra forward/backward pass.

  Args:
    structure: a :class:`BasisPathStructure`, a callable building one from the params (called
      once per params layout: treedef, shapes, dtypes), or ``None`` to infer a single chain from
      the params (static: only paths and shapes are read; a tree without Dense/Conv kernels has
      nothing in G-space and passes through).
    weight_decay: optional L2 coefficient on the non-skeleton basis-path values (the reference
      code's weight decay); leaves outside G-space get ``weight_decay * w``.
    bn_scaling: How chain layers whose output is normalized (only in structures from
      ``trace_structure(..., normalization='reference')``, see ``Layer.normalized``) scale path
      gradients: ``'weight'`` (the reference code's default: non-skeleton path gradients times
      the per-output-channel, per-tap L2 norm of the layer's kernel over input channels;
      skeleton-only path gradients divided by that norm at the centre tap; weight decay
      unscaled), ``'noweight'`` (the same factors applied to the path-space update instead),
      ``None`` (no scaling: the chain layout alone). No effect on structures without normalized
      layers. Not scale-invariant (BatchNorm chains are not in this sense).

  Returns:
    A stateless transform; ``update`` requires ``params``.
  """
  _check_bn_scaling(bn_scaling)
  return _stateless_with_params(
      "to_path_gradients",
      lambda s, updates, params: pathspace.path_gradients(s, params, updates, weight_decay,
                                                          bn_scaling=bn_scaling),
      structure)


def allocate_path_updates(structure: StructureLike = None, min_ratio: float | None = MIN_RATIO,
                          *, bn_scaling: BnScaling = "weight"
                          ) -> optax.GradientTransformationExtraArgs:
  """Weight allocation: maps a path-space update ``dv`` to the exact weight update.

  After ``optax.apply_updates(params, updates)`` every basis-path value equals ``v + dv``.
  The designated skeleton edge of each skeleton-only path ``s`` is multiplied by
  ``R_s / R_parent`` with ``R_s = (v_s + dv_s) / v_s``; a non-skeleton weight leaving hidden node
  ``i`` becomes ``(w + dv / (B F)) / R(i)``; a bias ``b + dv / F``; other skeleton weights stay.

  Args:
    structure: as in :func:`to_path_gradients`.
    min_ratio: guard: ``R_s`` is clipped to ``[min_ratio, 1 / min_ratio]`` so that no skeleton
      path value changes sign or collapses in one step (default
      ``gsgd_jax._defaults.MIN_RATIO = 0.1``). ``None`` disables it (exact always).
    bn_scaling: as in :func:`to_path_gradients` (use the same value in both).

  Returns:
    A stateless transform; ``update`` requires ``params``.
  """
  _check_bn_scaling(bn_scaling)
  return _stateless_with_params(
      "allocate_path_updates",
      lambda s, updates, params: pathspace.allocate(s, params, updates, min_ratio,
                                                    bn_scaling=bn_scaling),
      structure)


class GSpaceState(NamedTuple):
  """State of :func:`g_space`.

  Attributes:
    path_scale: ``(num_chains,)`` the scale ``s`` of each chain's path coordinates ``u = v / s``,
      computed once at init (:func:`gsgd_jax.pathspace.path_scales`; unused when
      ``normalize=False`` or ``balance=1``).
    inner_state: the state of the path-space optimizer.
  """
  path_scale: jax.Array
  inner_state: optax.OptState


def _has_arrays(tree: Any) -> bool:
  leaves = jax.tree_util.tree_leaves(tree)
  return bool(leaves) and all(hasattr(x, "shape") and hasattr(x, "dtype") for x in leaves)


def g_space(inner: optax.GradientTransformation, *, structure: StructureLike = None,
            weight_decay: Any = None, min_ratio: float | None = MIN_RATIO,
            fallback: Fallback = None, normalize: bool = True, balance: float = 1.0,
            bn_scaling: BnScaling = "weight") -> optax.GradientTransformationExtraArgs:
  """Runs any optax transform in G-space: ``to_path_gradients``, ``inner``, ``allocate``.

  With ``normalize=True`` (default) ``inner`` works in the path coordinates ``u = v / s``, one
  scale ``s`` per chain computed once at init from the skeleton-only path values
  (:func:`gsgd_jax.pathspace.path_scales`): ``inner`` sees ``s dL/dv`` and its update ``du``
  moves the basis-path values by ``s du``. For SGD this is G-SGD with learning rate ``lr s^2``;
  for Adam, ``lr s``. ``s`` is a constant and a function of path values only, so the update stays
  exact (after the step ``v' = v + s du``) and invariant under positive rescaling; its effect is
  that learning rates have the magnitudes they have for the weight-space optimizer (in a gauge
  where all skeleton weights are equal, the step on a non-skeleton weight is the weight-space
  step). ``s = 1`` when all skeleton weights are 1 (the reference initialization), so there the
  update is the paper's G-SGD either way. ``normalize=False``: plain ``v`` coordinates.

  Params with no chain at all (a plain array, a tree without Dense/Conv kernels) are trained by
  the fallback in weight space; ``init`` says so once (``fallback='error'`` refuses them).

  Args:
    inner: the path-space optimizer, e.g. ``optax.chain(optax.trace(0.9), optax.scale(-0.1))`` or
      ``optax.adam(1e-3)``. Its updates must include the learning rate and sign, as usual.
    structure: see :func:`to_path_gradients`; resolved once per params layout and cached in the
      returned transform.
    weight_decay: L2 on non-skeleton basis-path values (on ``u`` with ``normalize=True``: the
      path values decay by ``lr * weight_decay`` per SGD step, as weights do under SGD).
    min_ratio: skeleton-path guard of :func:`allocate_path_updates` (default
      ``gsgd_jax._defaults.MIN_RATIO = 0.1``).
    fallback: what trains leaves outside G-space. ``None``: ``inner`` itself, in weight space;
      an optax transform: that transform (via ``optax.partition``); ``'error'``: raise at init if
      any leaf is outside G-space.
    normalize: work in the normalized path coordinates ``u = v / s`` (see above).
    balance: in ``[0, 1]``, with ``normalize``: a per-path scale ``sigma = s^(1-balance)
      sigma_bal^balance`` instead of ``s``, where ``sigma_bal`` is the product of the path's
      skeleton weights in a balanced gauge (each skeleton weight on the skeleton path through a
      node ``u`` of magnitude ``|v_skel(u)|^(1/L)``; skeleton-only paths also get ``1 / n``,
      ``n`` the non-skeleton edges leaving their class), computed from the current
      params at every step (measured better than fixing it at init: docs/method.md).
      ``balance=1``: in that gauge non-skeleton weights take the weight-space optimizer's step;
      ``0``: G-SGD's own per-path steps. A function of path values: exact and invariant.
    bn_scaling: the reference code's BatchNorm heuristic on normalized chain layers; see
      :func:`to_path_gradients`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`GSpaceState` (inside
    ``optax.partition`` when ``fallback`` is a transform).
  """
  if isinstance(balance, (int, float)) and not 0.0 <= balance <= 1.0:
    raise ValueError(f"balance must be in [0, 1], got {balance!r}.")
  _check_bn_scaling(bn_scaling)
  inner = _params_sharded(inner)
  resolve = _Resolver(structure)
  check = _params_check(resolve, fallback)
  partitioned = not (fallback is None or fallback == "error")

  def init_fn(params):
    if not partitioned:  # with optax.partition the full params are checked below
      check(params)
    if _has_arrays(params):
      s = resolve(params)
      scale = (pathspace.path_scales(s, params) if normalize
               else jax.numpy.ones((len(s.chains),), jax.numpy.float32))
    else:  # a placeholder (optax.tree.map_params): no values to read
      scale = jax.numpy.ones((0,), jax.numpy.float32)
    return GSpaceState(scale, inner.init(params))

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError("g_space needs the current params: call tx.update(grads, state, params).")
    s = resolve(params)
    scale = state.path_scale if normalize else None
    bal = balance if normalize else 0.0
    pg = _like_params(pathspace.path_gradients(s, params, updates, weight_decay, scale, bal,
                                               bn_scaling=bn_scaling), params)
    dv, inner_state = inner.update(pg, state.inner_state, params, **extra_args)
    new = _like_params(pathspace.allocate(s, params, dv, min_ratio, scale, bal,
                                          bn_scaling=bn_scaling), params)
    return new, GSpaceState(state.path_scale, inner_state)

  core = optax.GradientTransformationExtraArgs(init_fn, update_fn)
  if not partitioned:
    return optax.with_extra_args_support(core)

  def labels(params):
    g = resolve(params).gspace_paths
    return map_with_paths(lambda p, _: "gspace" if p in g else "fallback", params)

  part = optax.partition({"gspace": core, "fallback": fallback}, labels)

  def part_init(params):
    check(params)
    return part.init(params)

  return optax.GradientTransformationExtraArgs(part_init, part.update)


def _is_zero(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and x == 0


def gsgd(learning_rate: optax.ScalarOrSchedule, momentum: float | None = None,
         nesterov: bool = False, weight_decay: float | None = 0.0, *,
         structure: StructureLike = None, fallback: Fallback = None,
         min_ratio: float | None = MIN_RATIO, normalize: bool = True, balance: float = 1.0,
         bn_scaling: BnScaling = "weight") -> optax.GradientTransformationExtraArgs:
  r"""G-SGD: stochastic gradient descent on the basis-path values of a ReLU network.

  .. math::
    v_{t+1} = v_t - \eta_t \, m_t, \quad m_t = \mu m_{t-1} + \partial L / \partial v
    + \lambda v_{\text{non-skeleton}}

  realised by an exact weight update (weight allocation). The update is invariant under the
  positive rescaling of hidden units: one step from ``w`` and from any rescaled ``w`` give the same
  function. Momentum lives in path space, weight decay is L2 on non-skeleton basis-path values.
  Leaves outside G-space are trained by SGD with the same hyperparameters (or ``fallback``);
  params with nothing in G-space (a plain array) are trained by SGD, with a warning at ``init``.

  Args:
    learning_rate: a float or an optax schedule.
    momentum: momentum decay in path space (``None``, the default, or 0: no momentum buffer).
    nesterov: Nesterov momentum.
    weight_decay: L2 coefficient on non-skeleton basis-path values.
    structure: a :class:`BasisPathStructure`, a callable, or ``None`` to infer a single chain
      from the params (Dense/Conv kernels in natural name order); see :func:`to_path_gradients`.
    fallback: see :func:`g_space`.
    min_ratio: skeleton-path guard (see :func:`allocate_path_updates`; default
      ``gsgd_jax._defaults.MIN_RATIO = 0.1``).
    normalize: learning rates on SGD's scale: the path coordinates are ``u = v / s`` with one
      invariant constant ``s`` per chain computed at init (see :func:`g_space`), so the exact
      update is ``v' = v - lr s^2 m`` (``s = 1`` at the reference initialization).
      ``False``: the paper's ``v' = v - lr m``.
    balance: per-path learning rates between G-SGD's (0) and SGD's in a balanced gauge (1); see
      :func:`g_space`.
    bn_scaling: the reference code's BatchNorm heuristic on normalized chain layers; see
      :func:`to_path_gradients`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` requires ``params``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, gsgd_jax
    >>> params = {'Dense_0': {'kernel': jnp.ones((3, 4)) * 0.5, 'bias': jnp.zeros(4)},
    ...           'Dense_1': {'kernel': jnp.ones((4, 2)) * 0.5}}
    >>> structure = gsgd_jax.infer_structure(params)
    >>> tx = gsgd_jax.gsgd(0.1, momentum=0.9, structure=structure)
    >>> state = tx.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = tx.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)

  References:
    Meng et al., `G-SGD: Optimizing ReLU Neural Networks in its Positively Scale-Invariant Space
    <https://arxiv.org/abs/1802.03713>`_, ICLR 2019.
  """
  _check_learning_rate(learning_rate)
  parts = []
  if momentum is not None and not _is_zero(momentum):
    parts.append(optax.trace(decay=momentum, nesterov=nesterov))
  parts.append(optax.scale_by_learning_rate(learning_rate))
  wd = None if (weight_decay is None or _is_zero(weight_decay)) else weight_decay
  return g_space(optax.chain(*parts), structure=structure, weight_decay=wd, min_ratio=min_ratio,
                 fallback=fallback, normalize=normalize, balance=balance, bn_scaling=bn_scaling)


def gsgd_adam(learning_rate: optax.ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999,
              eps: float = 1e-8, weight_decay: float | None = 0.0, *,
              structure: StructureLike = None, fallback: Fallback = None,
              min_ratio: float | None = MIN_RATIO, normalize: bool = True, balance: float = 1.0,
              bn_scaling: BnScaling = "weight") -> optax.GradientTransformationExtraArgs:
  """Adam in G-space: ``optax.adam`` applied to ``dL/dv``, then exact weight allocation.

  With ``normalize=True`` (default) Adam runs on ``u = v / s`` (see :func:`g_space`), so the
  learning rate has Adam's usual magnitude.

  Scale-invariant like G-SGD (the moments live on basis-path gradients). Leaves outside G-space
  are trained by Adam in weight space (or ``fallback``); params with nothing in G-space (a plain
  array) are trained by Adam, with a warning at ``init``.

  Args:
    learning_rate: a float or an optax schedule (Adam's usual magnitude, e.g. ``1e-3``).
    b1: decay of the first moment of ``dL/du``.
    b2: decay of the second moment.
    eps: added to the root of the second moment, as in ``optax.adam``.
    weight_decay: L2 coefficient on non-skeleton basis-path values (added to ``dL/du`` before
      Adam: L2, not decoupled decay).
    structure: see :func:`gsgd`.
    fallback: see :func:`g_space`.
    min_ratio: skeleton-path guard (see :func:`allocate_path_updates`; default
      ``gsgd_jax._defaults.MIN_RATIO = 0.1``).
    normalize: run Adam on ``u = v / s`` (see :func:`g_space`).
    balance: see :func:`g_space`.
    bn_scaling: the reference code's BatchNorm heuristic on normalized chain layers; see
      :func:`to_path_gradients`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`GSpaceState` (Adam's state
    inside); ``update`` requires ``params``.

  Examples:
    >>> import jax.numpy as jnp, gsgd_jax
    >>> params = {'Dense_0': {'kernel': jnp.ones((3, 4))}, 'Dense_1': {'kernel': jnp.ones((4, 2))}}
    >>> tx = gsgd_jax.gsgd_adam(1e-3, structure=gsgd_jax.infer_structure(params))
    >>> state = tx.init(params)
  """
  _check_learning_rate(learning_rate)
  wd = None if (weight_decay is None or _is_zero(weight_decay)) else weight_decay
  return g_space(optax.adam(learning_rate, b1=b1, b2=b2, eps=eps), structure=structure,
                 weight_decay=wd, min_ratio=min_ratio, fallback=fallback, normalize=normalize,
                 balance=balance, bn_scaling=bn_scaling)
