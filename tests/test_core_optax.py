"""The optax contract: jit without retracing, inject_hyperparams, MultiSteps, schedules, dtypes."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gsgd_jax
from nets import mlp_apply, mlp_params, mse_loss, regression_batch

# Several tests use the bare gsgd(lr) on plain chains: its one note is expected.
pytestmark = [pytest.mark.usefixtures("fast_compiles"),
              pytest.mark.filterwarnings("ignore:gsgd_jax. no structure given:UserWarning")]

WIDTHS = (4, 6, 6, 3)


def _problem(dtype=jnp.float32):
  params = mlp_params(WIDTHS, bias=True, dtype=dtype)
  x, y = regression_batch(WIDTHS[0], WIDTHS[-1], dtype=dtype)
  return params, mse_loss(mlp_apply, x, y)


OPTIMIZERS = {
    "gsgd": lambda: gsgd_jax.gsgd(0.05),
    "gsgd_momentum": lambda: gsgd_jax.gsgd(0.05, momentum=0.9, nesterov=True, weight_decay=1e-4),
    "gsgd_adam": lambda: gsgd_jax.gsgd_adam(1e-2),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_jit_without_retracing(name):
  params, loss = _problem()
  tx = OPTIMIZERS[name]()
  state = tx.init(params)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(params, state):
    grads = jax.grad(loss)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  losses = [float(loss(params))]
  for _ in range(5):
    params, state = step(params, state)
    losses.append(float(loss(params)))
  assert losses[-1] < losses[0]
  chex.clear_trace_counter()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_dtypes_preserved_and_state_stable(name, dtype):
  params, loss = _problem(dtype)
  tx = OPTIMIZERS[name]()
  state = tx.init(params)
  shapes0 = jax.tree.map(lambda x: (x.shape, x.dtype), state)
  update = jax.jit(tx.update)
  for _ in range(2):
    grads = jax.grad(loss)(params)
    updates, state = update(grads, state, params)
    chex.assert_trees_all_equal_dtypes(updates, params)
    chex.assert_tree_all_finite(updates)
    params = optax.apply_updates(params, updates)
  chex.assert_trees_all_equal_dtypes(params, mlp_params(WIDTHS, dtype=dtype))
  assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == shapes0


def test_float64_dtype(x64):
  params, loss = _problem(jnp.float64)
  tx = gsgd_jax.gsgd(0.05, momentum=0.9)
  updates, _ = tx.update(jax.grad(loss)(params), tx.init(params), params)
  chex.assert_trees_all_equal_dtypes(updates, params)
  assert jax.tree.leaves(updates)[0].dtype == jnp.float64


@pytest.mark.parametrize("factory,kwargs", [
    (gsgd_jax.gsgd, dict(learning_rate=0.05, momentum=0.9, weight_decay=1e-3)),
    (gsgd_jax.gsgd, dict(learning_rate=0.05)),
    (gsgd_jax.gsgd_adam, dict(learning_rate=1e-2, b1=0.8)),
])
def test_inject_hyperparams_identical(x64, factory, kwargs):
  # float64: constant folding differs between the two programs (optax.adam itself differs by
  # ~1e-5 relative in float32); in float64 the results agree to rounding.
  params, loss = _problem(jnp.float64)
  kwargs = dict(kwargs, structure=gsgd_jax.infer_structure(params))  # see test_first_hour
  plain = factory(**kwargs)
  injected = optax.inject_hyperparams(factory)(**kwargs)
  s1, s2 = plain.init(params), injected.init(params)
  p1 = p2 = params
  for _ in range(3):
    u1, s1 = jax.jit(plain.update)(jax.grad(loss)(p1), s1, p1)
    u2, s2 = jax.jit(injected.update)(jax.grad(loss)(p2), s2, p2)
    p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
  chex.assert_trees_all_close(p1, p2, rtol=1e-10, atol=1e-12)
  # the injected learning rate can be changed between steps
  s2.hyperparams["learning_rate"] = jnp.asarray(0.0)
  u, _ = injected.update(jax.grad(loss)(p2), s2, p2)
  chex.assert_trees_all_close(u, jax.tree.map(jnp.zeros_like, u), atol=1e-7)


def test_schedule_is_followed():
  params, loss = _problem()
  sched = optax.piecewise_constant_schedule(0.05, {1: 0.0})  # 0.05 then 0
  tx = gsgd_jax.gsgd(sched)
  state = tx.init(params)
  u0, state = tx.update(jax.grad(loss)(params), state, params)
  assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(u0)) > 0
  u1, state = tx.update(jax.grad(loss)(params), state, params)
  assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(u1)) == 0


def test_multisteps_accumulates_gradients():
  params, loss = _problem()
  tx = optax.MultiSteps(gsgd_jax.gsgd(0.05, momentum=0.9), every_k_schedule=2)
  state = tx.init(params)
  g = jax.grad(loss)(params)
  u, state = jax.jit(tx.update)(g, state, params)
  assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(u))
  u, state = jax.jit(tx.update)(g, state, params)
  ref = gsgd_jax.gsgd(0.05, momentum=0.9)
  want, _ = ref.update(g, ref.init(params), params)
  chex.assert_trees_all_close(u, want, rtol=1e-5, atol=1e-7)


def test_extra_args_and_map_params():
  params, loss = _problem()
  tx = gsgd_jax.gsgd(0.05, momentum=0.9)
  assert isinstance(tx, optax.GradientTransformationExtraArgs)
  state = tx.init(params)
  u, _ = tx.update(jax.grad(loss)(params), state, params, some_extra_arg=1.0)
  # optax.tree.map_params calls init with a placeholder: init must not read values.
  specs = optax.tree.map_params(tx, lambda _: "spec", state, transform_non_params=lambda _: None)
  assert "spec" in jax.tree.leaves(specs)
  chained = optax.chain(optax.clip_by_global_norm(1.0), tx)
  chained.update(jax.grad(loss)(params), chained.init(params), params)


def test_custom_fallback_and_apply_if_finite():
  params, loss = _problem()
  params["scale"] = jnp.ones(3)
  tx = gsgd_jax.gsgd(0.05, fallback=optax.set_to_zero())
  state = tx.init(params)
  grads = jax.grad(lambda p: loss({k: v for k, v in p.items() if k != "scale"}) + jnp.sum(p["scale"]))(params)
  u, _ = tx.update(grads, state, params)
  np.testing.assert_array_equal(u["scale"], 0.0)
  assert float(jnp.abs(u["Dense_0"]["kernel"]).max()) > 0
  # default fallback: SGD with the same hyperparameters
  tx = gsgd_jax.gsgd(0.05)
  u, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(u["scale"], -0.05 * grads["scale"], rtol=1e-6)
  # non-finite gradients propagate so that optax.apply_if_finite can skip the step
  safe = optax.apply_if_finite(gsgd_jax.gsgd(0.05), max_consecutive_errors=3)
  st = safe.init(params)
  bad = jax.tree.map(lambda g: g.at[0].set(jnp.nan) if g.ndim == 1 else g, grads)
  u, st = safe.update(bad, st, params)
  assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(u))
  assert int(st.notfinite_count) == 1


def _deep_chain(depth=30, width=64):
  key = jax.random.PRNGKey(0)
  params = {}
  for l in range(depth):
    key, sub = jax.random.split(key)
    params[f"Dense_{l}"] = {"kernel": jax.nn.initializers.lecun_normal()(sub, (width, width)),
                            "bias": jnp.zeros(width)}
  x, y = regression_batch(width, width, dtype=jnp.float32)
  return params, mse_loss(mlp_apply, x, y)


@pytest.mark.filterwarnings("ignore:Skeleton-only basis paths have values:UserWarning")  # 30 layers
def test_deep_chain_finite_at_default_init_and_trains_after_reset():
  """30 layers. At lecun-normal init (no skeleton reset) skeleton products reach ~1e-30: the
  guarded update must stay finite. With the reference initialization the chain trains."""
  params, loss = _deep_chain()
  tx = gsgd_jax.gsgd(0.01, momentum=0.9)
  step = jax.jit(lambda p, s: tx.update(jax.grad(loss)(p), s, p))  # compiled once, used twice
  u, _ = step(params, tx.init(params))
  chex.assert_tree_all_finite(u)

  # the reference initialization of the aligned skeleton, trained with that structure
  s = gsgd_jax.infer_structure(params)
  params = gsgd_jax.reset_skeleton(s, params, others_scale=0.2)
  tx = gsgd_jax.gsgd(0.01, momentum=0.9, structure=s)
  step = jax.jit(lambda p, s: tx.update(jax.grad(loss)(p), s, p))
  state, p = tx.init(params), params
  for _ in range(5):
    u, state = step(p, state)
    chex.assert_tree_all_finite(u)
    p = optax.apply_updates(p, u)
  assert float(loss(p)) < float(loss(params))


def test_skeleton_ratio_guard():
  """A huge step would flip the sign of skeleton paths; the guard keeps R in [0.1, 10]."""
  params, loss = _problem()
  s = gsgd_jax.infer_structure(params)
  g = jax.grad(loss)(params)
  tx = gsgd_jax.gsgd(1e4, structure=s)
  new = optax.apply_updates(params, tx.update(g, tx.init(params), params)[0])
  chex.assert_tree_all_finite(new)
  mask = gsgd_jax.skeleton_mask(s, params)
  v0 = gsgd_jax.basis_path_values(s, params)
  v1 = gsgd_jax.basis_path_values(s, new)
  # designated skeleton edges of the first layer hold skeleton-only path values
  des = np.asarray(mask["Dense_0"]["kernel"])
  r = np.asarray(v1["Dense_0"]["kernel"])[des] / np.asarray(v0["Dense_0"]["kernel"])[des]
  assert np.all(r >= 0.1 - 1e-6) and np.all(r <= 10 + 1e-5)


@pytest.mark.parametrize("name", ["gsgd_momentum", "gsgd_adam"])
def test_accelerator_code_path_matches_cpu(x64, monkeypatch, name):
  """The update built for GPUs/TPUs (per-node vectors not pinned) equals the CPU one."""
  params = mlp_params((3, 5, 2, 7, 4, 2), bias=True, dtype=jnp.float64)
  x, y = regression_batch(3, 2, dtype=jnp.float64)
  grads = jax.grad(mse_loss(mlp_apply, x, y))(params)

  def update():
    tx = OPTIMIZERS[name]()
    state = tx.init(params)
    return jax.jit(tx.update)(grads, state, params)[0]

  on_cpu = update()
  jax.clear_caches()
  monkeypatch.setattr(gsgd_jax.pathspace.jax, "default_backend", lambda: "gpu")
  on_gpu = update()
  jax.clear_caches()
  chex.assert_trees_all_close(on_cpu, on_gpu, rtol=1e-12, atol=1e-14)
