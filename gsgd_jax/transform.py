"""Optax transformations for G-space: inverse chain rule, weight allocation, G-SGD, G-space Adam.

Every G-space optimizer is a chain of public transforms::

    optax.chain(to_path_gradients(structure, weight_decay=wd, coordinates=c),
                <any optax transform>,
                allocate_path_updates(structure, coordinates=c))

1. :func:`to_path_gradients` turns ``dL/dw`` into the gradient with respect to the path
   coordinates ``u = v / sigma`` of every basis path (inverse chain rule), laid out like the
   params (``sigma = 1`` with :data:`gsgd_jax.PAPER`: then it is ``dL/dv``);
2. any optax transform (momentum, Adam, clipping, schedules) runs on it and produces ``du``;
3. :func:`allocate_path_updates` turns ``du`` into the exact weight update (weight allocation):
   after the step the basis-path values are ``v + sigma du``.

:func:`g_space` is that chain (plus ``fallback=`` routing), :func:`gsgd` and :func:`gsgd_adam`
are ``g_space`` around ``optax``'s own SGD and Adam pieces. Leaves outside G-space
(normalization scales, embeddings, shortcut convolutions, ...) pass through steps 1 and 3
unchanged, so step 2 trains them in weight space. Both blocks carry the fingerprint of their
structure's skeleton in their state (:class:`PathSpaceState`): a state restored into an optimizer
whose structure has another skeleton is refused (the README's "Checkpoints" section).
"""

from __future__ import annotations

import functools
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gsgd_jax import pathspace
from gsgd_jax._checks import (_check_learning_rate, _note_inferred, _note_nothing_in_gspace,
                              check_gradients, check_params)
from gsgd_jax._resolve import Resolver, StructureLike, guard, is_concrete, skeleton_id
from gsgd_jax._sharding import _like_params, _params_sharded, replicated_like
from gsgd_jax._tree import map_with_paths, path_str
from gsgd_jax.coordinates import PathCoordinates

__all__ = [
    "to_path_gradients",
    "allocate_path_updates",
    "g_space",
    "gsgd",
    "gsgd_adam",
    "PathSpaceState",
    "check_params",
    "check_gradients",
]

Fallback = optax.GradientTransformation | Literal["error"] | None
_DEFAULT = PathCoordinates()

_MOVED = {
    "normalize": "coordinates=gsgd_jax.PathCoordinates(normalize=...) (the paper's plain "
                 "coordinates: coordinates=gsgd_jax.PAPER)",
    "balance": "coordinates=gsgd_jax.PathCoordinates(balance=...)",
    "min_ratio": "coordinates=gsgd_jax.PathCoordinates(min_ratio=...)",
    "bn_scaling": "the structure's bn_scaling: gsgd_jax.trace_structure(..., "
                  "normalization='reference', bn_scaling=...) or "
                  "dataclasses.replace(structure, bn_scaling=...)",
}


def _moved_keywords(fn):
  """Makes ``fn`` raise a ``TypeError`` naming the replacement of a keyword of gsgd_jax 0.1
  (its signature, which ``optax.inject_hyperparams`` reads, stays ``fn``'s own)."""

  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    for name in kwargs:
      if name in _MOVED:
        raise TypeError(f"{fn.__name__}: the keyword {name}= was removed in gsgd_jax 0.2; pass "
                        f"{_MOVED[name]}. See CHANGELOG.md.")
    return fn(*args, **kwargs)

  return wrapper


def _coordinates(owner: str, coordinates: Any) -> PathCoordinates:
  if not isinstance(coordinates, PathCoordinates):
    raise TypeError(f"{owner}: coordinates must be a gsgd_jax.PathCoordinates (or "
                    f"gsgd_jax.PAPER), got {type(coordinates).__name__}.")
  return coordinates


class PathSpaceState(NamedTuple):
  """State of :func:`to_path_gradients` and :func:`allocate_path_updates`.

  Attributes:
    skeleton: ``()`` int32, the fingerprint of the structure (chains and skeleton assignment)
      the optimizer's path-space state belongs to; checked at every update (``-1``: built from
      placeholder params).
    path_scale: ``(num_chains,)`` float32, the per-chain scale ``s`` of the path coordinates
      (:func:`gsgd_jax.path_scales`), fixed at ``init``; only used when
      ``PathCoordinates.balance < 1`` (1.0 otherwise).
  """
  skeleton: jax.Array
  path_scale: jax.Array


def _path_space_block(name: str, resolve: Resolver, coordinates: PathCoordinates, fn,
                      check: bool) -> optax.GradientTransformationExtraArgs:
  """A transform ``updates -> fn(structure, updates, params, path_scale)`` with a
  :class:`PathSpaceState`; ``update`` requires params and checks the state's skeleton."""

  def init_fn(params):
    s = resolve.init(params)
    if s is None:  # placeholder params (optax.tree.map_params): nothing to read
      return PathSpaceState(skeleton_id(None), jnp.ones((0,), jnp.float32))
    if check and is_concrete(params) and s.chains:
      check_params(s, params)
    if coordinates.needs_path_scale and s.chains:
      scale = pathspace.path_scales(s, params).astype(jnp.float32)
    else:
      scale = jnp.ones((len(s.chains),), jnp.float32)
    return PathSpaceState(replicated_like(params, skeleton_id(s)), replicated_like(params, scale))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError(f"{name} needs the current params: call tx.update(grads, state, params).")
    s = resolve.update(params)
    if not s.chains:
      return updates, state
    out = fn(s, updates, params, state.path_scale if coordinates.needs_path_scale else None)
    out = guard(s, state.skeleton, name, out)
    return _like_params(out, params), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _to_path_gradients(resolve, weight_decay, coordinates, check=True):
  c = coordinates
  return _path_space_block(
      "to_path_gradients", resolve, c,
      lambda s, updates, params, scale: pathspace.path_gradients(
          s, params, updates, weight_decay, coordinates=c, path_scale=scale), check)


def _allocate_path_updates(resolve, coordinates):
  c = coordinates
  return _path_space_block(
      "allocate_path_updates", resolve, c,
      lambda s, updates, params, scale: pathspace.allocate(
          s, params, updates, coordinates=c, path_scale=scale), False)


@_moved_keywords
def to_path_gradients(structure: StructureLike = None, weight_decay: Any = None, *,
                      coordinates: PathCoordinates = _DEFAULT) -> optax.GradientTransformationExtraArgs:
  """Inverse chain rule: maps weight gradients ``dL/dw`` to path-coordinate gradients ``dL/du``.

  With ``u = v / sigma`` (``sigma`` from ``coordinates``; ``1`` with :data:`gsgd_jax.PAPER`):
  ``dL/du = sigma dL/dv``. Non-skeleton weight ``e = (i -> j)``: ``dL/dv_e = g_e / (B(i) F(j))``;
  bias: ``g_b / F(j)``; skeleton-only path ``s``: ``dL/dv_s = (x_r - sum of x_e over the other
  basis paths through r) / v_s`` with ``x = w * g`` and ``r`` its designated edge. ``O(m)``, no
  extra forward/backward pass. ``init`` checks the skeleton weights (zero or non-finite ones
  raise an error naming them).

  Args:
    structure: a :class:`BasisPathStructure`; a callable building one from the params (called
      at ``init``, once per params layout: treedef, shapes, dtypes); or ``None``:
      ``infer_structure(params)`` on the params given to ``init`` (one chain read from names,
      skeleton aligned to those values; ``init`` must then see concrete arrays). A tree without
      Dense/Conv kernels has nothing in G-space and passes through.
    weight_decay: optional L2 coefficient on the non-skeleton path coordinates (the reference
      code's weight decay); leaves outside G-space get ``weight_decay * w``.
    coordinates: the path coordinates (:class:`gsgd_jax.PathCoordinates`); use the same object
      in :func:`allocate_path_updates`.

  Returns:
    A transform with state :class:`PathSpaceState`; ``update`` requires ``params``.
  """
  coordinates = _coordinates("to_path_gradients", coordinates)
  return _to_path_gradients(Resolver(structure, "to_path_gradients"), weight_decay, coordinates)


@_moved_keywords
def allocate_path_updates(structure: StructureLike = None, *,
                          coordinates: PathCoordinates = _DEFAULT) -> optax.GradientTransformationExtraArgs:
  """Weight allocation: maps a path-coordinate update ``du`` to the exact weight update.

  After ``optax.apply_updates(params, updates)`` every basis-path value equals
  ``v + sigma du`` (``sigma = 1`` with :data:`gsgd_jax.PAPER`). The designated skeleton edge of
  each skeleton-only path ``s`` is multiplied by ``R_s / R_parent`` with
  ``R_s = (v_s + dv_s) / v_s`` (clipped to ``[min_ratio, 1 / min_ratio]``); a non-skeleton weight
  leaving hidden node ``i`` becomes ``(w + dv / (B F)) / R(i)``; a bias ``b + dv / F``; other
  skeleton weights stay.

  Args:
    structure: as in :func:`to_path_gradients`.
    coordinates: the path coordinates and the skeleton-path guard
      (:class:`gsgd_jax.PathCoordinates`); the same object as in :func:`to_path_gradients`.

  Returns:
    A transform with state :class:`PathSpaceState`; ``update`` requires ``params``.
  """
  coordinates = _coordinates("allocate_path_updates", coordinates)
  return _allocate_path_updates(Resolver(structure, "allocate_path_updates"), coordinates)


def _params_check(resolve: Resolver, fallback: Fallback):
  """What ``g_space``'s ``init`` says or refuses once per transform, on concrete params: which
  chain ``structure=None`` read from names, that nothing is in G-space, ``fallback='error'``."""
  noted = []

  def check(params) -> None:
    s = resolve.init(params)
    if s is None or not is_concrete(params):
      return
    if not s.chains:
      if fallback == "error":
        what = ("no Dense/Conv kernel in the params" if resolve.inferred
                else "the structure has no chain")
        leaves = ", ".join(path_str(p) or "<the array>" for p in s.fallback[:8])
        raise ValueError(
            "G-space was demanded for every parameter (fallback='error') but nothing is in "
            f"G-space: {what} (leaves: {leaves}{', ...' if len(s.fallback) > 8 else ''}). "
            "Pass fallback=None to train them in weight space, or a structure with chains.")
      if not noted:
        noted.append(True)
        _note_nothing_in_gspace(s, resolve.inferred, fallback)
      return
    if resolve.inferred and not noted:
      noted.append(True)
      _note_inferred(s)
    if fallback == "error" and s.fallback:
      raise ValueError(
          "G-space was demanded for every parameter (fallback='error') but these are outside "
          f"it: {', '.join(path_str(p) for p in s.fallback)}. Pass fallback=None (train them "
          "with the same optimizer in weight space) or an optax transform.")

  return check


@_moved_keywords
def g_space(inner: optax.GradientTransformation, *, structure: StructureLike = None,
            weight_decay: Any = None, coordinates: PathCoordinates = _DEFAULT,
            fallback: Fallback = None,
            _owner: str = "gsgd_jax.g_space(inner)") -> optax.GradientTransformationExtraArgs:
  """Runs any optax transform in G-space.

  ``g_space(inner, structure=s, weight_decay=wd, coordinates=c)`` is::

      optax.chain(to_path_gradients(s, wd, coordinates=c), inner,
                  allocate_path_updates(s, coordinates=c))

  (one structure resolution shared by both blocks; ``inner``'s updates and params-shaped state
  keep the params' shardings). ``inner`` sees the gradient with respect to the path coordinates
  ``u = v / sigma`` and its update ``du`` moves the basis-path values by ``sigma du``, exactly.
  With the default coordinates learning rates have the magnitudes they have for the
  weight-space optimizer; with :data:`gsgd_jax.PAPER` ``inner`` runs on ``v`` itself.

  Args:
    inner: the path-space optimizer, e.g. ``optax.sgd(0.1, momentum=0.9)`` or
      ``optax.adam(1e-3)``. Its updates must include the learning rate and sign, as usual.
    structure: see :func:`to_path_gradients`.
    weight_decay: L2 on non-skeleton path coordinates (the path values decay by
      ``lr * weight_decay`` per SGD step, as weights do under SGD).
    coordinates: the path coordinates and guard (:class:`gsgd_jax.PathCoordinates`).
    fallback: what trains leaves outside G-space. ``None``: ``inner`` itself, in weight space;
      an optax transform: that transform (via ``optax.partition``); ``'error'``: raise at init if
      any leaf is outside G-space.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is the chain's tuple
    ``(PathSpaceState, inner state, PathSpaceState)`` (inside ``optax.partition`` when
    ``fallback`` is a transform).

  Examples:
    >>> import jax, jax.numpy as jnp, optax, gsgd_jax
    >>> params = {'Dense_0': {'kernel': jnp.array([[1., -2.], [0.5, 1.]])},
    ...           'Dense_1': {'kernel': jnp.array([[1.], [2.]])}}
    >>> s = gsgd_jax.infer_structure(params)
    >>> tx = gsgd_jax.g_space(optax.adam(1e-3), structure=s)
    >>> chained = optax.chain(gsgd_jax.to_path_gradients(s), optax.adam(1e-3),
    ...                       gsgd_jax.allocate_path_updates(s))
    >>> g = jax.tree.map(jnp.ones_like, params)
    >>> a, _ = tx.update(g, tx.init(params), params)
    >>> b, _ = chained.update(g, chained.init(params), params)
    >>> bool(jax.tree.all(jax.tree.map(lambda x, y: jnp.array_equal(x, y), a, b)))
    True
  """
  coordinates = _coordinates(_owner, coordinates)
  resolve = Resolver(structure, _owner)
  core = optax.chain(
      _to_path_gradients(resolve, weight_decay, coordinates),
      _params_sharded(inner),
      _allocate_path_updates(resolve, coordinates))
  check = _params_check(resolve, fallback)
  partitioned = not (fallback is None or (isinstance(fallback, str) and fallback == "error"))
  if isinstance(fallback, str) and fallback != "error":
    raise ValueError(f"fallback must be None, 'error' or an optax transform, got {fallback!r}.")

  if not partitioned:
    def init_fn(params):
      check(params)
      return core.init(params)
    return optax.GradientTransformationExtraArgs(init_fn, core.update)

  def labels(params):
    g = resolve.update(params).gspace_paths
    return map_with_paths(lambda p, _: "gspace" if p in g else "fallback", params)

  part = optax.partition({"gspace": core, "fallback": fallback}, labels)

  def part_init(params):
    check(params)
    return part.init(params)

  return optax.GradientTransformationExtraArgs(part_init, part.update)


def _is_zero(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and x == 0


def _path_sgd_inner(learning_rate, momentum, nesterov) -> optax.GradientTransformation:
  parts = []
  if momentum is not None and not _is_zero(momentum):
    parts.append(optax.trace(decay=momentum, nesterov=nesterov))
  parts.append(optax.scale_by_learning_rate(learning_rate))
  return optax.chain(*parts)


@_moved_keywords
def gsgd(learning_rate: optax.ScalarOrSchedule, momentum: float | None = None,
         nesterov: bool = False, weight_decay: float | None = None, *,
         structure: StructureLike = None, coordinates: PathCoordinates = _DEFAULT,
         fallback: Fallback = None) -> optax.GradientTransformationExtraArgs:
  r"""G-SGD: stochastic gradient descent on the basis-path values of a ReLU network.

  .. math::
    u_{t+1} = u_t - \eta_t \, m_t, \quad m_t = \mu m_{t-1} + \partial L / \partial u
    + \lambda u_{\text{non-skeleton}}, \qquad u = v / \sigma

  realised by an exact weight update (weight allocation). By construction::

      gsgd(lr, momentum, nesterov, wd, structure=s, coordinates=c)
        == g_space(optax.chain(optax.trace(momentum, nesterov),
                               optax.scale_by_learning_rate(lr)),
                   structure=s, weight_decay=wd, coordinates=c)
        == optax.chain(to_path_gradients(s, wd, coordinates=c),
                       optax.trace(momentum, nesterov), optax.scale_by_learning_rate(lr),
                       allocate_path_updates(s, coordinates=c))

  (no ``trace`` without momentum). The update is invariant under the positive rescaling of
  hidden units: one step from ``w`` and from any rescaled ``w`` give the same function. Leaves
  outside G-space are trained by SGD with the same hyperparameters (or ``fallback``).

  Args:
    learning_rate: a float or an optax schedule (SGD's magnitude with the default
      coordinates).
    momentum: momentum decay in path space (``None``, the default, or 0: no momentum buffer).
    nesterov: Nesterov momentum.
    weight_decay: L2 coefficient on non-skeleton path coordinates (``None``: none).
    structure: a :class:`BasisPathStructure`, a callable, or ``None``: the structure
      ``infer_structure(params)`` builds from the params given to ``tx.init`` (a plain
      Dense/Conv chain, skeleton aligned to those values); see :func:`to_path_gradients`.
    coordinates: the path coordinates (:class:`gsgd_jax.PathCoordinates`; the paper's G-SGD:
      ``coordinates=gsgd_jax.PAPER``).
    fallback: see :func:`g_space`.

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
  coordinates = _coordinates("gsgd", coordinates)
  wd = None if (weight_decay is None or _is_zero(weight_decay)) else weight_decay
  return g_space(_path_sgd_inner(learning_rate, momentum, nesterov), structure=structure,
                 weight_decay=wd, coordinates=coordinates, fallback=fallback, _owner="gsgd_jax.gsgd(lr)")


@_moved_keywords
def gsgd_adam(learning_rate: optax.ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999,
              eps: float = 1e-8, weight_decay: float | None = None, *,
              structure: StructureLike = None, coordinates: PathCoordinates = _DEFAULT,
              fallback: Fallback = None) -> optax.GradientTransformationExtraArgs:
  """Adam in G-space: ``g_space(optax.adam(learning_rate, b1, b2, eps), ...)``.

  By construction::

      gsgd_adam(lr, b1, b2, eps, wd, structure=s, coordinates=c)
        == optax.chain(to_path_gradients(s, wd, coordinates=c), optax.adam(lr, b1, b2, eps),
                       allocate_path_updates(s, coordinates=c))

  Scale-invariant like G-SGD (the moments live on path-coordinate gradients); with the default
  coordinates the learning rate has Adam's usual magnitude. Leaves outside G-space are trained by
  Adam in weight space (or ``fallback``).

  Args:
    learning_rate: a float or an optax schedule (e.g. ``1e-3``).
    b1: decay of the first moment of ``dL/du``.
    b2: decay of the second moment.
    eps: added to the root of the second moment, as in ``optax.adam``.
    weight_decay: L2 coefficient on non-skeleton path coordinates (added to ``dL/du`` before
      Adam: L2, not decoupled decay; ``None``: none).
    structure: see :func:`gsgd`.
    coordinates: see :func:`gsgd`.
    fallback: see :func:`g_space`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` requires ``params``.

  Examples:
    >>> import jax.numpy as jnp, gsgd_jax
    >>> params = {'Dense_0': {'kernel': jnp.ones((3, 4))}, 'Dense_1': {'kernel': jnp.ones((4, 2))}}
    >>> tx = gsgd_jax.gsgd_adam(1e-3, structure=gsgd_jax.infer_structure(params))
    >>> state = tx.init(params)
  """
  _check_learning_rate(learning_rate)
  coordinates = _coordinates("gsgd_adam", coordinates)
  wd = None if (weight_decay is None or _is_zero(weight_decay)) else weight_decay
  return g_space(optax.adam(learning_rate, b1=b1, b2=b2, eps=eps), structure=structure,
                 weight_decay=wd, coordinates=coordinates, fallback=fallback, _owner="gsgd_jax.gsgd_adam(lr)")
