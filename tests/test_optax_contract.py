"""The optax contract for every optimizer of the package (the properties optax checks for its
contributed optimizers), on network-shaped params and on plain arrays.

Optimizers: ``gsgd`` (plain, momentum, Nesterov, weight decay), ``gsgd_adam``, ``g_space`` around
three optax optimizers, and ``path_sgd``. Problems: a Dense MLP and a 1-D conv chain (params dicts
``Dense_i``/``Conv_i``, teacher targets), a single array and a dict of arrays without kernels
(quadratics: nothing is in G-space, the fallback trains them in weight space).

Properties:

* ``test_contract`` (every optimizer x every problem): extra ``update`` arguments are accepted
  and ignored; updates and params-shaped state keep float32; ``jax.lax.cond`` over ``update``
  and a no-op branch traces (the state keeps its structure, shapes and dtypes through
  ``update``); a jitted update is traced once over 40 steps (no recompilation) and the loss goes
  down by a clear margin.
* ``test_wrappers`` (every optimizer x one network, one plain array: these touch only the state
  and hyperparameter plumbing): ``optax.inject_hyperparams`` (a learning rate changed in
  ``state.hyperparams`` is the one used), a schedule as learning rate, ``optax.MultiSteps``
  (no update, then the update of the mean gradient).
* dtypes: float32 (in ``test_contract``), bfloat16 (``test_dtypes_bfloat16``) and float64
  (``test_dtypes_float64``, a few optimizers): updates and params-shaped state keep the params'
  dtypes, the state's dtypes do not change, values stay finite.

Small shapes, numpy initialisation, eager calls where one step suffices (the G-space maths is
jitted inside the library, cached per structure), one compiled train step per case.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gsgd_jax
from gsgd_jax.path_sgd import path_sgd

# structure=None reads the chain from names and says so once per transform; plain arrays have
# nothing in G-space and say that: all expected. XLA's optimization passes are most of this
# file's time and none of the properties depends on them (conftest's fast_compiles).
pytestmark = [pytest.mark.usefixtures("fast_compiles"),
              pytest.mark.filterwarnings("ignore:gsgd_jax. no structure given:UserWarning"),
              pytest.mark.filterwarnings("ignore:gsgd_jax. nothing is in G-space:UserWarning"),
              pytest.mark.filterwarnings("ignore:gsgd_jax.path_sgd. no chain:UserWarning"),
              pytest.mark.filterwarnings("ignore:Skeleton-only basis paths have values:UserWarning")]


# ------------------------------------------------------------------------------------------------
# Optimizers: factories of the learning rate (a float, a schedule or an injected hyperparameter)
# ------------------------------------------------------------------------------------------------

OPTIMIZERS = {
    "gsgd": (lambda learning_rate, **kw: gsgd_jax.gsgd(learning_rate, **kw), 0.05),
    "gsgd_momentum": (lambda learning_rate, **kw: gsgd_jax.gsgd(learning_rate, momentum=0.9, **kw), 0.02),
    "gsgd_nesterov": (lambda learning_rate, **kw: gsgd_jax.gsgd(learning_rate, momentum=0.9,
                                                          nesterov=True, **kw), 0.02),
    "gsgd_weight_decay": (lambda learning_rate, **kw: gsgd_jax.gsgd(learning_rate, weight_decay=1e-3, **kw),
                          0.05),
    "gsgd_adam": (lambda learning_rate, **kw: gsgd_jax.gsgd_adam(learning_rate, **kw), 0.03),
    "g_space_adam": (lambda learning_rate, **kw: gsgd_jax.g_space(optax.adam(learning_rate), **kw), 0.03),
    "g_space_sgd_momentum": (lambda learning_rate, **kw: gsgd_jax.g_space(
        optax.sgd(learning_rate, momentum=0.9), **kw), 0.02),
    "g_space_clip_adam": (lambda learning_rate, **kw: gsgd_jax.g_space(optax.chain(
        optax.clip_by_global_norm(1.0), optax.adam(learning_rate)), **kw), 0.03),
    "path_sgd": (lambda learning_rate, **kw: path_sgd(learning_rate, **kw), 0.05),
    "path_sgd_momentum": (lambda learning_rate, **kw: path_sgd(learning_rate, momentum=0.9, **kw), 0.02),
}

# ------------------------------------------------------------------------------------------------
# Problems: (params, loss) in a given dtype; losses computed in float32 at least
# ------------------------------------------------------------------------------------------------


def _mlp_apply(p, x):
  n = len(p)
  for l in range(n):
    x = x @ p[f"Dense_{l}"]["kernel"] + p[f"Dense_{l}"]["bias"]
    if l < n - 1:
      x = jax.nn.relu(x)
  return x


def _conv_apply(p, x):
  for name in ("Conv_0", "Conv_1"):
    x = jax.lax.conv_general_dilated(x, p[name]["kernel"], (1,), "SAME",
                                     dimension_numbers=("NWC", "WIO", "NWC")) + p[name]["bias"]
    x = jax.nn.relu(x)
  return x.mean(axis=1) @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]


def _dense(rng, a, b, taps=()):
  fan_in = a * int(np.prod(taps, dtype=int))
  return {"kernel": rng.normal(size=(*taps, a, b)) * np.sqrt(2.0 / fan_in),
          "bias": 0.1 * rng.normal(size=b)}


@functools.cache
def _numpy_problem(name):
  """``(params, loss_fn, inputs)`` in float64 numpy; ``loss_fn(params, inputs)``."""
  rng = np.random.default_rng(0)
  if name == "mlp":
    widths = (3, 8, 8, 2)
    make = lambda: {f"Dense_{l}": _dense(rng, a, b)  # noqa: E731
                    for l, (a, b) in enumerate(zip(widths[:-1], widths[1:]))}
    teacher, params = make(), make()
    x = rng.normal(size=(32, 3))
    y = np.asarray(_mlp_apply(teacher, x))
    loss = lambda p, d: jnp.mean((_mlp_apply(p, d[0]) - d[1]) ** 2)  # noqa: E731
    return params, loss, (x, y)
  if name == "conv":
    make = lambda: {"Conv_0": _dense(rng, 1, 4, (3,)), "Conv_1": _dense(rng, 4, 4, (3,)),  # noqa: E731
                    "Dense_0": _dense(rng, 4, 2)}
    teacher, params = make(), make()
    x = rng.normal(size=(16, 8, 1))
    y = np.asarray(_conv_apply(teacher, x))
    loss = lambda p, d: jnp.mean((_conv_apply(p, d[0]) - d[1]) ** 2)  # noqa: E731
    return params, loss, (x, y)
  if name == "array":  # a single array: a separable quadratic
    c = rng.uniform(0.5, 2.0, size=5)
    t = rng.uniform(-1.0, 1.0, size=5)
    loss = lambda p, d: jnp.sum(d[0] * (p - d[1]) ** 2)  # noqa: E731
    return np.zeros(5), loss, (c, t)
  if name == "dict_arrays":  # least squares, no `kernel` leaves
    x = rng.normal(size=(16, 3))
    w_true, b_true = rng.normal(size=(3, 4)), rng.normal(size=4)
    y = x @ w_true + b_true
    loss = lambda p, d: jnp.mean((d[0] @ p["w"] + p["b"] - d[1]) ** 2) * 4  # noqa: E731
    return {"w": np.zeros((3, 4)), "b": np.zeros(4)}, loss, (x, y)
  raise ValueError(name)


PROBLEMS = ("mlp", "conv", "array", "dict_arrays")


@functools.cache
def _problem(name, dtype=jnp.float32):
  """``(params, loss)``: params in ``dtype``, the loss (jitted) closed over float32 (or float64)
  data. Cached: the loss and its gradient compile once per problem for all optimizers."""
  params, loss, data = _numpy_problem(name)
  data_dtype = jnp.float64 if dtype == jnp.float64 else jnp.float32
  data = jax.tree.map(lambda a: jnp.asarray(a, data_dtype), data)
  params = jax.tree.map(lambda a: jnp.asarray(a, dtype), params)

  @jax.jit
  def loss_fn(p):
    return loss(jax.tree.map(lambda a: a.astype(data_dtype), p), data)

  return params, loss_fn


@functools.partial(jax.jit, static_argnums=0)
def _grads_jit(loss, params):
  return jax.tree.map(lambda g, p: g.astype(p.dtype), jax.grad(loss)(params), params)


def _grads(loss, params):
  """Gradients in the params' dtypes (compiled once per problem and dtype)."""
  return _grads_jit(loss, params)


def _zero(tree) -> bool:
  return all(float(jnp.max(jnp.abs(x))) == 0.0 for x in jax.tree.leaves(tree))


def _close(a, b, rtol=1e-5, atol=1e-7):
  chex.assert_trees_all_close(a, b, rtol=rtol, atol=atol)


def _types(tree):
  return jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), tree)


# ------------------------------------------------------------------------------------------------
# The contract
# ------------------------------------------------------------------------------------------------

STEPS = 40
# The loss must fall below this fraction of its initial value within STEPS steps.
MARGIN = {"mlp": 0.5, "conv": 0.5, "array": 0.2, "dict_arrays": 0.2}


@pytest.mark.parametrize("problem", PROBLEMS)
@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_contract(opt, problem):
  """Extra args, state stability (``lax.cond``), no retracing, convergence."""
  make, lr = OPTIMIZERS[opt]
  params, loss = _problem(problem)
  tx = make(lr)
  state = tx.init(params)
  g = _grads(loss, params)

  # extra arguments: accepted, ignored
  u_plain, s_plain = tx.update(g, state, params)
  u_extra, s_extra = tx.update(g, state, params, some_extra_arg=jnp.ones(3), another="x")
  _close(u_extra, u_plain, rtol=0, atol=0)
  chex.assert_trees_all_equal_structs(s_extra, s_plain)

  # float32: updates and params-shaped state in the params' dtype (bfloat16, float64: below)
  chex.assert_trees_all_equal_dtypes(u_plain, params)
  _check_state_dtypes(s_plain, params)

  # state structure, shapes and dtypes stable under update and through jax.lax.cond
  assert _types(jax.eval_shape(lambda: tx.update(g, state, params)[1])) == _types(state)
  jax.eval_shape(lambda flag: jax.lax.cond(flag, lambda: tx.update(g, state, params)[1],
                                           lambda: state), True)

  # a jitted update is traced once over repeated calls (its outputs feed back unchanged), and
  # the loss goes down by a clear margin
  traces = []

  def counted(*args, **extra):
    traces.append(None)
    return tx.update(*args, **extra)

  update = jax.jit(counted)
  p, s = params, state
  first = float(loss(p))
  for _ in range(STEPS):
    u, s = update(_grads(loss, p), s, p, some_extra_arg=jnp.float32(1.0))
    p = optax.apply_updates(p, u)
  assert len(traces) == 1, f"{len(traces)} traces"
  final = float(loss(p))
  assert np.isfinite(final) and final < MARGIN[problem] * first, (first, final)


# The wrappers below touch only the optimizer's state and hyperparameter plumbing, which does not
# depend on the params' layout: one network and one plain array per optimizer.
@pytest.mark.parametrize("problem", ["mlp", "array"])
@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_wrappers(opt, problem):
  """``inject_hyperparams``, a schedule as learning rate, ``MultiSteps``."""
  make, lr = OPTIMIZERS[opt]
  params, loss = _problem(problem)
  g = _grads(loss, params)
  ref = make(lr)
  u_plain, _ = ref.update(g, ref.init(params), params)

  # inject_hyperparams: the learning rate in state.hyperparams is the one used. It re-creates
  # the transform at every update, so a network's structure is built once and passed (the bare
  # call's structure is chosen at tx.init: test_bare_call_under_inject_hyperparams_names_the_fix)
  structure = gsgd_jax.infer_structure(params) if problem == "mlp" else None
  injected = optax.inject_hyperparams(
      lambda learning_rate: make(learning_rate, structure=structure))(learning_rate=lr)
  s_inj = injected.init(params)
  s_inj.hyperparams["learning_rate"] = jnp.asarray(2 * lr)
  u_inj, _ = injected.update(g, s_inj, params)
  ref = make(2 * lr)
  _close(u_inj, ref.update(g, ref.init(params), params)[0], rtol=1e-4, atol=1e-6)
  s_inj.hyperparams["learning_rate"] = jnp.asarray(0.0)
  assert _zero(injected.update(g, s_inj, params)[0])

  # a schedule as learning rate: lr at step 0, then 0
  sched = make(optax.piecewise_constant_schedule(lr, {1: 0.0}))
  s_sched = sched.init(params)
  u0, s_sched = sched.update(g, s_sched, params)
  _close(u0, u_plain)
  u1, _ = sched.update(g, s_sched, params)
  assert _zero(u1)

  # MultiSteps: nothing after the first of two microbatches, then the mean gradient's update
  multi = optax.MultiSteps(make(lr), every_k_schedule=2)
  s_multi = multi.init(params)
  g2 = jax.tree.map(lambda x: (x * 0.5).astype(x.dtype), g)
  multi_update = jax.jit(multi.update)  # one compilation (eager lax.cond compiles every call)
  u, s_multi = multi_update(g, s_multi, params)
  assert _zero(u)
  u, s_multi = multi_update(g2, s_multi, params)
  mean = jax.tree.map(lambda a, b: (a + b) / 2, g, g2)
  ref = make(lr)
  _close(u, ref.update(mean, ref.init(params), params)[0], rtol=1e-5, atol=1e-7)


def _check_dtypes(make, lr, params, loss, run=False):
  """Dtypes of two updates (abstractly: ``jax.eval_shape``, no compilation), and with ``run``
  two real updates whose values must be finite."""
  tx = make(lr)
  state = tx.init(params)
  types0 = _types(state)
  p = params
  for _ in range(2):
    g = _grads(loss, p)
    if run:
      u, state = tx.update(g, state, p)
      chex.assert_tree_all_finite(u)
    else:
      u, state = jax.eval_shape(tx.update, g, state, p)
    chex.assert_trees_all_equal_dtypes(u, p)
    assert _types(state) == types0
    _check_state_dtypes(state, params)
    if run:
      p = optax.apply_updates(p, u)
      chex.assert_trees_all_equal_dtypes(p, params)


def _check_state_dtypes(state, params):
  """Params-shaped buffers of the state (momentum, Adam moments) have the params' dtypes."""
  pdef = jax.tree.structure(params)
  shapes = jax.tree.map(jnp.shape, params)
  like = lambda n: jax.tree.structure(n) == pdef and jax.tree.map(jnp.shape, n) == shapes  # noqa: E731
  for node in jax.tree.leaves(state, is_leaf=like):
    if like(node):
      chex.assert_trees_all_equal_dtypes(node, params)


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_dtypes_bfloat16(opt):
  make, lr = OPTIMIZERS[opt]
  for problem in PROBLEMS:
    _check_dtypes(make, lr, *_problem(problem, jnp.bfloat16), run=problem == "mlp")


@pytest.mark.parametrize("opt", ["gsgd_momentum", "g_space_clip_adam", "path_sgd_momentum"])
def test_dtypes_float64(x64, opt):
  make, lr = OPTIMIZERS[opt]
  for problem in PROBLEMS:
    params, loss = _problem(problem, jnp.float64)
    assert jax.tree.leaves(params)[0].dtype == jnp.float64
    _check_dtypes(make, lr, params, loss, run=problem == "mlp")


# ------------------------------------------------------------------------------------------------
# Plain-array params: the fallback trains them; one warning at init; fallback="error" refuses
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("factory,weight_space", [
    (lambda **kw: gsgd_jax.gsgd(0.1, momentum=0.9, **kw), optax.sgd(0.1, momentum=0.9)),
    (lambda **kw: gsgd_jax.gsgd_adam(0.1, **kw), optax.adam(0.1)),
    (lambda **kw: gsgd_jax.g_space(optax.adamw(0.1), **kw), optax.adamw(0.1)),
], ids=["gsgd", "gsgd_adam", "g_space"])
@pytest.mark.parametrize("problem", ["array", "dict_arrays"])
@pytest.mark.filterwarnings("error:gsgd_jax. nothing is in G-space:UserWarning")
def test_plain_arrays_trained_in_weight_space(factory, weight_space, problem):
  params, loss = _problem(problem)
  tx = factory()
  with pytest.warns(UserWarning, match="nothing is in G-space") as caught:
    state = tx.init(params)
  assert len([w for w in caught if "G-space" in str(w.message)]) == 1
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    tx.init(params)  # once per transform
  ref_state = weight_space.init(params)
  p = q = params
  for _ in range(3):
    u, state = tx.update(_grads(loss, p), state, p)
    v, ref_state = weight_space.update(_grads(loss, q), ref_state, q)
    _close(u, v, rtol=1e-6, atol=1e-7)
    p, q = optax.apply_updates(p, u), optax.apply_updates(q, v)
  with pytest.raises(ValueError, match=r"fallback='error'.*nothing is in G-space"):
    factory(fallback="error").init(params)
  # a fallback transform trains them too (optax.partition), with the same single warning
  tx = factory(fallback=optax.sgd(0.1))
  with pytest.warns(UserWarning, match="nothing is in G-space"):
    state = tx.init(params)
  u, _ = tx.update(_grads(loss, params), state, params)
  sgd = optax.sgd(0.1)
  _close(u, sgd.update(_grads(loss, params), sgd.init(params), params)[0], rtol=1e-6)


def test_path_sgd_plain_arrays_is_sgd():
  params, loss = _problem("dict_arrays")
  tx = path_sgd(0.1)
  with pytest.warns(UserWarning, match="nothing is rescaled"):
    state = tx.init(params)
  u, _ = tx.update(_grads(loss, params), state, params)
  _close(u, jax.tree.map(lambda g: -0.1 * g, _grads(loss, params)))


# ------------------------------------------------------------------------------------------------
# The structure is resolved once per transform and params layout, never stale
# ------------------------------------------------------------------------------------------------

def _mlp(widths, seed):
  rng = np.random.default_rng(seed)
  return {f"Dense_{l}": jax.tree.map(jnp.asarray, _dense(rng, a, b))
          for l, (a, b) in enumerate(zip(widths[:-1], widths[1:]))}


@pytest.mark.parametrize("make", [
    lambda s: gsgd_jax.gsgd(0.05, momentum=0.9, structure=s),
    lambda s: gsgd_jax.g_space(optax.adam(1e-2), structure=s, fallback=optax.sgd(0.1)),
    lambda s: optax.chain(gsgd_jax.to_path_gradients(s), gsgd_jax.allocate_path_updates(s)),
    lambda s: path_sgd(0.05, structure=s),
], ids=["gsgd", "g_space_partition", "to_path_and_allocate", "path_sgd"])
def test_structure_resolved_once_per_layout(make):
  calls = []

  def structure(params):
    calls.append(jax.tree.map(jnp.shape, params))
    return gsgd_jax.infer_structure(params, skeleton="modulo")

  tx = make(structure)
  layouts = [_mlp((3, 5, 2), 0), _mlp((3, 7, 4, 2), 1), _mlp((3, 6, 2), 2)]  # the last: shapes only
  for round_ in range(2):
    for params in layouts:
      before = len(calls)
      g = jax.tree.map(jnp.ones_like, params)
      state = tx.init(params)
      u, state = tx.update(g, state, params)
      u, state = tx.update(g, state, params)
      if round_:  # a layout seen before: the cached structure, no call
        assert len(calls) == before, calls[before:]
        continue
      # a new layout: the callable is called once per resolver that sees it
      assert 1 <= len(calls) - before <= 2, calls[before:]
      assert all(c == jax.tree.map(jnp.shape, params) for c in calls[before:])
      # the same updates as a transform that never saw another layout (never a stale structure)
      fresh = make(lambda p: gsgd_jax.infer_structure(p, skeleton="modulo"))
      fs = fresh.init(params)
      for _ in range(2):
        want, fs = fresh.update(g, fs, params)
      _close(u, want, rtol=1e-6, atol=1e-7)


def test_bn_scaling_lives_with_the_structure():
  for factory in (gsgd_jax.gsgd, gsgd_jax.gsgd_adam):
    with pytest.raises(TypeError, match=r"bn_scaling=.*trace_structure\(.*normalization='reference'"):
      factory(0.1, bn_scaling="weight")
  with pytest.raises(TypeError, match="bn_scaling"):
    gsgd_jax.to_path_gradients(bn_scaling=None)
  params = _mlp((3, 5, 2), 0)
  with pytest.raises(ValueError, match="bn_scaling must be"):
    gsgd_jax.trace_structure(lambda p, x: x, params, jnp.ones(3), bn_scaling="batch")
  s = gsgd_jax.infer_structure(params)
  assert s.bn_scaling is None and not s.normalized_layers
  assert gsgd_jax.BasisPathStructure.from_json(
      dataclasses.replace(s, bn_scaling="noweight").to_json()).bn_scaling == "noweight"


def test_momentum_none_is_the_default_and_means_no_buffer():
  import inspect
  assert inspect.signature(gsgd_jax.gsgd).parameters["momentum"].default is None
  params = _mlp((3, 5, 2), 0)
  s = gsgd_jax.infer_structure(params)
  g = jax.tree.map(jnp.ones_like, params)
  states = [gsgd_jax.gsgd(0.1, momentum=m, structure=s).init(params) for m in (None, 0.0)]
  assert jax.tree.structure(states[0]) == jax.tree.structure(states[1])
  assert not any(jnp.shape(x) == (3, 5) for x in jax.tree.leaves(states[0]))  # no trace buffer
  u = [gsgd_jax.gsgd(0.1, momentum=m, structure=s).update(g, st, params)[0]
       for m, st in zip((None, 0.0), states)]
  _close(u[0], u[1], rtol=0, atol=0)
