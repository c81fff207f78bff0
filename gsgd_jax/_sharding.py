"""Sharding helpers of the G-space transforms: updates and params-shaped state keep the params'
shardings, and a workaround for JAX's cached ``shard_alike`` lowering (applied lazily)."""

from __future__ import annotations

import re
import warnings
from typing import Any

import jax
import optax
from jax.experimental.shard_alike import shard_alike

from gsgd_jax._warnings import GSpaceWarning

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
        GSpaceWarning, stacklevel=2)
    return
  try:
    _uncached_shard_alike_lowering()
  except (ImportError, AttributeError, TypeError) as e:  # private API moved: keep JAX's lowering
    warnings.warn(f"gsgd_jax: could not apply the shard_alike lowering workaround ({e!r}); "
                  "shardings of same-shaped parameters may be merged.", GSpaceWarning, stacklevel=2)


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


def replicated_like(params: Any, x: jax.Array) -> jax.Array:
  """``x`` (a small state array) replicated over the mesh of ``params`` when they are sharded
  over a mesh with Explicit axes (so that the state keeps one sharding across steps and a jitted
  step is not compiled twice); ``x`` unchanged otherwise."""
  for leaf in jax.tree.leaves(params):
    if not isinstance(leaf, jax.Array) or isinstance(leaf, jax.core.Tracer):
      continue  # inside jit the program decides the output's sharding
    s = leaf.sharding
    if (isinstance(s, jax.sharding.NamedSharding)
        and jax.sharding.AxisType.Explicit in s.mesh.axis_types):
      return jax.device_put(x, jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec()))
  return x
