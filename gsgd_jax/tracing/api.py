"""The entry points: :func:`trace_structure`, :func:`trace_report`, :func:`trace_nnx_structure`."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Callable, Literal

import jax
import numpy as np

from gsgd_jax._tree import leaves_with_paths
from gsgd_jax.skeleton import with_skeleton
from gsgd_jax.structure import BN_SCALINGS, BasisPathStructure
from gsgd_jax.tracing.graph import Graph, live_nodes
from gsgd_jax.tracing.report import build, format_report
from gsgd_jax.tracing.context import Context, Rule
from gsgd_jax.tracing.rules import DEFAULT_RULES
from gsgd_jax.tracing.values import TraceRecord

__all__ = ["trace_structure", "trace_nnx_structure", "trace_report"]

Normalization = Literal["exact", "reference"]
Unsupported = Literal["error", "exclude"]
# gsgd_jax 0.1 spelled both "fallback" (a third meaning of the word): still accepted.
_OLD_NORMALIZATION = {"fallback": "exact"}
_OLD_UNSUPPORTED = {"fallback": "exclude"}


def _trace(apply_fn, params, example_inputs, normalization, unsupported, kwargs,
           rules) -> TraceRecord:
  """Traces ``apply_fn`` and runs the dataflow pass."""
  normalization = _OLD_NORMALIZATION.get(normalization, normalization)
  unsupported = _OLD_UNSUPPORTED.get(unsupported, unsupported)
  if normalization not in ("exact", "reference"):
    raise ValueError(f"normalization must be 'exact' or 'reference', got {normalization!r}.")
  if unsupported not in ("error", "exclude"):
    raise ValueError(f"unsupported must be 'error' or 'exclude', got {unsupported!r}.")
  leaves, _ = leaves_with_paths(params)
  paths = [p for p, _ in leaves]
  shapes = {p: tuple(np.shape(x) if not hasattr(x, "shape") else x.shape) for p, x in leaves}

  def fn(p, *xs):
    out = apply_fn(p, *xs, **kwargs)
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], Mapping):
      return out[0]  # linen `apply(..., mutable=[...])`: (y, mutated collections)
    return out

  closed = jax.make_jaxpr(fn)(params, *example_inputs)
  graph = Graph()
  in_ids = [graph.new(v.aval) for v in closed.jaxpr.invars]
  if len(in_ids) < len(paths):
    raise ValueError("The traced function has fewer inputs than `params` has leaves; pass the "
                     "params pytree as the first argument of apply_fn.")
  graph.params = set(in_ids[:len(paths)])
  outputs = graph.inline(closed.jaxpr, closed.consts, in_ids, ())
  trace = TraceRecord(paths, shapes, normalization, unsupported)
  Context(graph, trace, rules).run(live_nodes(graph, outputs), in_ids[:len(paths)], outputs)
  return trace


def trace_structure(apply_fn: Callable[..., Any], params: Any, *example_inputs: Any,
                    normalization: Normalization = "exact", unsupported: Unsupported = "error",
                    skeleton: str = "aligned", bn_scaling: str | None = "weight",
                    rules: Mapping[str, Rule] = DEFAULT_RULES, **kwargs: Any) -> BasisPathStructure:
  """Discovers the basis-path structure of a model by tracing ``apply_fn(params, *inputs)``.

  Finds the Dense and Conv layers, follows the data from each layer's output and links two layers
  into one chain when the second one's input is a positively homogeneous, channel-wise function
  of the first one's output (bias add, ReLU, pooling, flatten, ...) that nothing else uses. See the
  module docstring for the rules. Layers left alone (a stem, a projection shortcut, a classifier
  after a residual stream, any layer next to a normalization) and every other parameter go to
  ``structure.fallback``, each with a reason in ``structure.notes``; ``print(structure)`` shows it.

  Args:
    apply_fn: the model as a function of its parameters. linen:
      ``lambda p, x: model.apply({'params': p, **other_collections}, x)``; nnx:
      ``lambda state, x: nnx.merge(graphdef, state, rest)(x)`` (nnx BatchNorm in training mode
      updates ``rest`` in place: pass it as an input, ``lambda p, rest, x: ...``). Everything it
      returns counts as network output, except that a ``(y, mutated_collections)`` pair counts
      as ``y``.
    params: the parameter pytree passed to ``apply_fn`` (linen dict, nnx ``State`` wrapped or not).
      The tracing reads paths and shapes only; the aligned skeleton reads the weights
      (``jax.ShapeDtypeStruct`` leaves work with ``skeleton='modulo'``).
    *example_inputs: example inputs (arrays or ``jax.ShapeDtypeStruct``); only shapes matter.
    normalization: ``'exact'`` (a normalized layer output ends its chain; ``'fallback'``, its
      gsgd_jax 0.1 name, is still accepted) or
      ``'reference'`` (the reference code's heuristic: chains run through normalization layers,
      whose parameters go to the fallback; not scale-invariant).
    unsupported: ``'error'`` raises on grouped/depthwise convolutions and shared weights,
      ``'exclude'`` trains those layers outside G-space instead, with a note (``'fallback'``,
      its gsgd_jax 0.1 name, is still accepted).
    skeleton: ``'aligned'`` (default: chosen from the weights, :func:`gsgd_jax.align_skeleton`)
      or ``'modulo'`` (the ``j mod h`` convention on unit indices).
    bn_scaling: with ``normalization='reference'``, the reference code's BatchNorm heuristic
      that G-space optimizers apply on the layers flagged normalized
      (:attr:`BasisPathStructure.bn_scaling`): ``'weight'`` (its default), ``'noweight'`` or
      ``None`` (the chain layout alone). Unused otherwise (the structure gets ``None``).
    rules: the tracing rule of each primitive (:data:`gsgd_jax.tracing.DEFAULT_RULES`); extend
      a copy for a custom primitive: ``rules={**DEFAULT_RULES, "my_relu": homogeneous_elementwise}``.
    **kwargs: static keyword arguments passed to ``apply_fn`` (e.g. ``train=True``).

  Returns:
    The :class:`BasisPathStructure`: chains of two or more layers in data-flow order; all other
    parameter leaves in ``fallback``, with reasons in ``notes``.

  Raises:
    ValueError: naming the parameter, for a grouped/depthwise convolution or a shared parameter
      (unless ``unsupported='exclude'``) and for an invalid policy.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> class Net(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     x = nn.relu(nn.Conv(4, (3, 3))(x))
    ...     x = nn.relu(nn.Conv(4, (3, 3))(x))
    ...     return nn.Dense(2)(x.reshape((x.shape[0], -1)))
    >>> model, x = Net(), jnp.ones((1, 5, 5, 3))
    >>> params = model.init(jax.random.PRNGKey(0), x)['params']
    >>> s = trace_structure(lambda p, x: model.apply({'params': p}, x), params, x)
    >>> s.chains[0].widths, s.chains[0].layers[-1].taps_shape
    ((3, 4, 4, 2), (5, 5))
  """
  trace = _trace(apply_fn, params, example_inputs, normalization, unsupported, kwargs, rules)
  return _finish(params, skeleton, bn_scaling)(build(trace)[0])


def _finish(params, skeleton: str, bn_scaling):
  """The last steps of :func:`trace_structure`: the skeleton, the BatchNorm scaling."""
  if bn_scaling not in BN_SCALINGS:
    raise ValueError(f"bn_scaling must be 'weight', 'noweight' or None, got {bn_scaling!r}.")

  def finish(s: BasisPathStructure) -> BasisPathStructure:
    s = with_skeleton(s, params, skeleton)
    return dataclasses.replace(s, bn_scaling=bn_scaling) if s.normalized_layers else s

  return finish


def trace_report(apply_fn: Callable[..., Any], params: Any, *example_inputs: Any,
                 normalization: Normalization = "exact", unsupported: Unsupported = "error",
                 skeleton: str = "aligned", bn_scaling: str | None = "weight",
                 rules: Mapping[str, Rule] = DEFAULT_RULES, **kwargs: Any) -> str:
  """:func:`trace_structure`'s findings as text: the structure, and why each chain starts and ends.

  Args:
    apply_fn, params, *example_inputs, normalization, unsupported, skeleton, bn_scaling, rules,
      **kwargs: as in :func:`trace_structure` (the summary is of the structure it returns).

  Returns:
    The text: the structure's summary (chains, fallback leaves with the reason for each), one
    line per chain saying why it starts and why it ends, and one line per loop (``scan``,
    ``while``) whose body was not traced into, saying why its layers are in the fallback.

  Examples:
    >>> import jax.numpy as jnp
    >>> params = {'a': {'kernel': jnp.ones((3, 4))}, 'b': {'kernel': jnp.ones((4, 2))}}
    >>> f = lambda p, x: jnp.maximum(x @ p['a']['kernel'], 0) @ p['b']['kernel']
    >>> print(trace_report(f, params, jnp.ones((1, 3))).splitlines()[-1])
      chain 0 (a -> b) starts: its input is the network input; ends: its output is a network output
  """
  finish = _finish(params, skeleton, bn_scaling)
  trace = _trace(apply_fn, params, example_inputs, normalization, unsupported, kwargs, rules)
  return format_report(trace, finish)


def trace_nnx_structure(model: Any, *example_inputs: Any, wrt: Any = None,
                        normalization: Normalization = "exact",
                        unsupported: Unsupported = "error", skeleton: str = "aligned",
                        bn_scaling: str | None = "weight",
                        rules: Mapping[str, Rule] = DEFAULT_RULES, **kwargs: Any
                        ) -> BasisPathStructure:
  """:func:`trace_structure` of an ``nnx.Module``, in the layout ``nnx.Optimizer`` uses.

  ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` hands ``tx`` the state ``nnx.state(model,
  nnx.Param)``; this traces ``model(*example_inputs, **kwargs)`` as a function of exactly that
  state (other variables, e.g. BatchNorm statistics, are passed along as inputs), so the returned
  structure plugs into ``gsgd_jax.gsgd(..., structure=...)`` for any nnx model, chain or not.

  Args:
    model: the ``nnx.Module`` (not modified).
    *example_inputs: example inputs of ``model``.
    wrt: the variable filter the optimizer uses (``nnx.Param`` if ``None``).
    normalization, unsupported, skeleton, bn_scaling, rules: as in :func:`trace_structure`.
    **kwargs: keyword arguments of ``model`` (e.g. ``deterministic=True``, or ``rngs=``: nnx
      ``Rngs`` and other array-holding objects are passed as traced inputs, not closed over).

  Returns:
    The :class:`BasisPathStructure`, with paths as in ``nnx.state(model, wrt)``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.relu,
    ...                        nnx.Linear(4, 2, rngs=nnx.Rngs(1)))
    >>> trace_nnx_structure(model, jnp.ones((1, 3))).chains[0].widths
    (3, 4, 2)
  """
  from flax import nnx  # the library itself does not need flax

  wrt = nnx.Param if wrt is None else wrt
  graphdef, params, rest = nnx.split(model, wrt, ...)

  # Keyword arguments that hold arrays (``rngs=nnx.Rngs(1)``, a mask) are pytrees: pass them
  # as traced inputs, so that nothing outside the trace is read or mutated inside it
  traced = {k: v for k, v in kwargs.items()
            if jax.tree.leaves(v) and all(hasattr(a, "shape") for a in jax.tree.leaves(v))}
  static = {k: v for k, v in kwargs.items() if k not in traced}

  def apply_fn(p, r, tr, *xs):
    return nnx.merge(graphdef, p, r)(*xs, **static, **tr)

  return trace_structure(apply_fn, params, rest, traced, *example_inputs,
                         normalization=normalization, unsupported=unsupported, skeleton=skeleton,
                         bn_scaling=bn_scaling, rules=rules)
