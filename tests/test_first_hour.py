"""What a user does in the first hour: the bare ``gsgd(lr)`` call, resuming, low-precision params.

* the bare call (no ``structure=``) is ``structure=infer_structure(params)`` on the params given
  to ``tx.init``, update for update, from He and from flax's (LeCun) init, Dense and conv;
* ``tx.init`` on abstract values and a bare transform re-created per update stop with an error
  that names the call to make; a model that is not one chain names ``trace_structure``;
* a state paired with a structure of another skeleton is refused (an error outside jit, NaN
  updates inside); structures round-trip through JSON;
* bfloat16/float16 params: structures build, training keeps the dtype, each block computes in
  float32; flax mixed precision traces and trains; integer and complex params are refused.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gsgd_jax

pytestmark = [pytest.mark.usefixtures("fast_compiles"),
              pytest.mark.filterwarnings("ignore:gsgd_jax. no structure given:UserWarning")]

OPTIMIZERS = {
    "gsgd": lambda **kw: gsgd_jax.gsgd(0.05, **kw),
    "gsgd_momentum": lambda **kw: gsgd_jax.gsgd(0.05, momentum=0.9, **kw),
    "gsgd_adam": lambda **kw: gsgd_jax.gsgd_adam(1e-2, **kw),
    "g_space_adam": lambda **kw: gsgd_jax.g_space(optax.adam(1e-2), **kw),
}


def _params(net: str, init: str, dtype=jnp.float32, seed=0):
  """A Dense chain or a conv chain with He (``2 / fan_in``) or LeCun (``1 / fan_in``) normal
  kernels, and its apply function."""
  rng = np.random.default_rng(seed)
  gain = 2.0 if init == "he" else 1.0
  if net == "dense":
    shapes = [(5, 16), (16, 16), (16, 16), (16, 3)]
  else:
    shapes = [(3, 2, 8), (3, 8, 8), (8, 3)]
  params = {}
  for l, shape in enumerate(shapes):
    fan_in = int(np.prod(shape[:-1]))
    name = f"Conv_{l}" if len(shape) == 3 else f"Dense_{l}"
    params[name] = {"kernel": jnp.asarray(rng.normal(size=shape) * np.sqrt(gain / fan_in), dtype),
                    "bias": jnp.zeros(shape[-1], dtype)}
  return params


def _apply(params, x):
  convs = sorted(k for k in params if k.startswith("Conv"))
  denses = sorted(k for k in params if k.startswith("Dense"))
  for k in convs:
    x = jax.nn.relu(jax.lax.conv_general_dilated(
        x, params[k]["kernel"], (1,), "SAME", dimension_numbers=("NWC", "WIO", "NWC"))
        + params[k]["bias"])
  if convs:
    x = x.mean(axis=1)
  for i, k in enumerate(denses):
    x = x @ params[k]["kernel"] + params[k]["bias"]
    if i < len(denses) - 1:
      x = jax.nn.relu(x)
  return x


def _data(net: str, dtype=jnp.float32):
  rng = np.random.default_rng(1)
  x = rng.normal(size=(32, 5) if net == "dense" else (16, 10, 2))
  y = rng.normal(size=(x.shape[0], 3))
  return jnp.asarray(x, dtype), jnp.asarray(y, jnp.float32)


def _loss(params, x, y):
  return jnp.mean((_apply(params, x).astype(jnp.float32) - y) ** 2)


def _run(tx, params, x, y, steps=3):
  state = tx.init(params)

  @jax.jit
  def step(p, s):
    g = jax.grad(_loss)(p, x, y)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  for _ in range(steps):
    params, state = step(params, state)
  return params


# ------------------------------------------------------------------------------------------------
# The bare call
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("init", ["he", "lecun"])
@pytest.mark.parametrize("net", ["dense", "conv"])
@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_bare_call_is_infer_structure_on_the_init_params(opt, net, init):
  params = _params(net, init)
  x, y = _data(net)
  bare = _run(OPTIMIZERS[opt](), params, x, y)
  explicit = _run(OPTIMIZERS[opt](structure=gsgd_jax.infer_structure(params)), params, x, y)
  assert gsgd_jax.infer_structure(params).chains[0].skeleton == "aligned"
  jax.tree.map(np.testing.assert_array_equal, bare, explicit)
  assert float(_loss(bare, x, y)) < float(_loss(params, x, y))


def test_bare_call_from_he_init_trains_where_modulo_did_not():
  """The issue's report: from He init the old bare call (modulo skeleton) gave NaN; the bare call
  now trains like the aligned structure does, and the modulo skeleton still struggles there."""
  params = _params("dense", "he", seed=3)
  x, y = _data("dense")
  first = float(_loss(params, x, y))
  bare = _run(gsgd_jax.gsgd(0.1, momentum=0.9), params, x, y, steps=30)
  assert np.isfinite(float(_loss(bare, x, y))) and float(_loss(bare, x, y)) < 0.7 * first


@pytest.mark.parametrize("abstract", ["jit", "eval_shape"])
def test_bare_init_on_abstract_values_names_the_call(abstract):
  params = _params("dense", "lecun")
  tx = gsgd_jax.gsgd(0.1, momentum=0.9)
  run = jax.jit(tx.init) if abstract == "jit" else (lambda p: jax.eval_shape(tx.init, p))
  with pytest.raises(ValueError, match=r"tx\.init got abstract values.*"
                                       r"gsgd_jax\.infer_structure\(params\)"):
    run(params)
  # with a structure built outside jit, init under jit is fine and equals the eager one
  s = gsgd_jax.infer_structure(params)
  tx = gsgd_jax.gsgd(0.1, momentum=0.9, structure=s)
  jax.tree.map(np.testing.assert_array_equal, jax.jit(tx.init)(params), tx.init(params))
  # a tree without kernels needs no values: nothing to align
  jax.jit(gsgd_jax.gsgd(0.1).init)({"w": jnp.ones(3)})


def test_bare_call_under_inject_hyperparams_names_the_fix():
  params = _params("dense", "lecun")
  g = jax.tree.map(jnp.ones_like, params)
  tx = optax.inject_hyperparams(gsgd_jax.gsgd)(learning_rate=0.1)
  state = tx.init(params)
  with pytest.raises(ValueError, match=r"inject_hyperparams.*structure=structure"):
    tx.update(g, state, params)
  s = gsgd_jax.infer_structure(params)
  tx = optax.inject_hyperparams(gsgd_jax.gsgd)(learning_rate=0.1, structure=s)
  u, _ = tx.update(g, tx.init(params), params)
  ref = gsgd_jax.gsgd(0.1, structure=s)
  jax.tree.map(np.testing.assert_array_equal, u, ref.update(g, ref.init(params), params)[0])


def test_bare_call_on_a_model_that_is_not_one_chain_names_trace_structure():
  params = {"Dense_0": {"kernel": jnp.ones((3, 4))}, "Dense_1": {"kernel": jnp.ones((5, 2))}}
  with pytest.raises(ValueError, match=r"Shapes do not chain.*gsgd_jax\.trace_structure\("):
    gsgd_jax.gsgd(0.1).init(params)


# ------------------------------------------------------------------------------------------------
# A state belongs to one skeleton; structures round-trip through JSON
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("opt", ["gsgd_momentum", "gsgd_adam"])
def test_state_of_another_skeleton_is_refused(opt):
  a, b = _params("dense", "he", seed=0), _params("dense", "he", seed=1)
  sa, sb = gsgd_jax.infer_structure(a), gsgd_jax.infer_structure(b)
  assert sa.chains[0].perms != sb.chains[0].perms
  state = OPTIMIZERS[opt](structure=sa).init(a)
  tx = OPTIMIZERS[opt](structure=sb)
  g = jax.tree.map(jnp.ones_like, a)
  with pytest.raises(ValueError, match=r"another basis-path structure.*BasisPathStructure\.from_json"):
    tx.update(g, state, a)
  u, _ = jax.jit(tx.update)(g, state, a)  # inside jit: NaN, never a silent update
  assert all(bool(jnp.isnan(x).all()) for x in jax.tree.leaves(u))
  # the same structure rebuilt from JSON is accepted
  tx = OPTIMIZERS[opt](structure=gsgd_jax.BasisPathStructure.from_json(sa.to_json()))
  u, _ = jax.jit(tx.update)(g, state, a)
  assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(u))


def test_structures_round_trip_through_json():
  class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.relu(nn.Conv(4, (3, 3), name="conv1")(x))
      h = nn.Conv(4, (3, 3), name="conv2")(h)
      x = nn.relu(x + nn.BatchNorm(use_running_average=True, name="bn")(h))
      return nn.Dense(2, name="head")(x.mean(axis=(1, 2)))

  x = jnp.ones((2, 6, 6, 4))
  model = Block()
  variables = model.init(jax.random.PRNGKey(0), x)
  apply = lambda p, x: model.apply({**variables, "params": p}, x)  # noqa: E731
  params = variables["params"]
  structures = [
      gsgd_jax.trace_structure(apply, params, x, normalization="reference"),
      gsgd_jax.infer_structure(_params("conv", "he")),
      gsgd_jax.infer_structure(_params("dense", "he"), skeleton="modulo"),
      gsgd_jax.chain_structure(_params("dense", "he"), [["Dense_0/kernel", "Dense_1/kernel"]]),
  ]
  assert any(l.normalized for l in structures[0].chains[0].layers) and structures[0].notes
  for s in structures:
    assert gsgd_jax.BasisPathStructure.from_json(s.to_json()) == s
    assert gsgd_jax.BasisPathStructure.from_dict(s.to_dict()) == s
  with pytest.raises(ValueError, match=r"structure\.to_json\(\)"):
    gsgd_jax.BasisPathStructure.from_json('{"chains": []}')
  with pytest.raises(ValueError, match="Not JSON"):
    gsgd_jax.BasisPathStructure.from_json("not json")


# ------------------------------------------------------------------------------------------------
# Low-precision params
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("net", ["dense", "conv"])
def test_structures_build_from_low_precision_params(net, dtype):
  p32 = _params(net, "he")
  params = jax.tree.map(lambda a: a.astype(dtype), p32)
  x, _ = _data(net, dtype)
  apply = _apply
  inferred = gsgd_jax.infer_structure(params)
  assert inferred.chains[0].skeleton == "aligned"
  names = [k for k in params]
  chained = gsgd_jax.chain_structure(params, [[f"{k}/kernel" for k in names]])
  traced = gsgd_jax.trace_structure(apply, params, x[:2])
  assert [l.kernel for l in traced.chains[0].layers] == [l.kernel for l in inferred.chains[0].layers]
  assert inferred == chained
  gsgd_jax.verify_structure(traced, apply, params, x[:4])
  # the skeleton chosen from the rounded weights may differ from float32's only by ties
  assert len(inferred.chains[0].layers) == len(gsgd_jax.infer_structure(p32).chains[0].layers)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("opt", ["gsgd", "gsgd_momentum"])
def test_low_precision_training_keeps_dtype_and_computes_in_float32(opt, dtype):
  params = jax.tree.map(lambda a: a.astype(dtype), _params("dense", "lecun"))
  x, y = _data("dense", dtype)
  s = gsgd_jax.infer_structure(params)
  tx = OPTIMIZERS[opt](structure=s)
  state = tx.init(params)
  g = jax.tree.map(lambda a: a.astype(dtype), jax.grad(_loss)(params, x, y))
  u, state = jax.jit(tx.update)(g, state, params)
  jax.tree.map(lambda a, b: (a.dtype == b.dtype) or pytest.fail(f"{a.dtype} != {b.dtype}"),
               u, params)
  # the same step on float32 copies of the same values: each block computes in float32 and
  # hands its result on in the params' dtype (as optax keeps its state), so the two agree to a
  # few units in the last place of the low-precision dtype
  up = lambda t: jax.tree.map(lambda a: a.astype(jnp.float32), t)  # noqa: E731
  tx32 = OPTIMIZERS[opt](structure=s)
  u32, _ = tx32.update(up(g), tx32.init(up(params)), up(params))
  ulp = float(jnp.finfo(dtype).eps)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      np.asarray(a, np.float32), np.asarray(b), rtol=4 * ulp, atol=4 * ulp * float(jnp.abs(b).max())),
      u, u32)
  # and it trains
  trained = _run(OPTIMIZERS[opt](structure=s), params, x, y, steps=20)
  assert all(a.dtype == dtype for a in jax.tree.leaves(trained))
  assert float(_loss(trained, x, y)) < 0.95 * float(_loss(params, x, y))


def test_float16_adam_goes_non_finite_like_optax_adam():
  """Adam's ``eps=1e-8`` underflows in float16 (the moments are stored in the params' dtype):
  optax.adam's updates go non-finite, and G-space Adam's do too. A dtype problem of Adam, shown
  here with optax's own optimizer as the control; use float32 params (flax's param_dtype)."""
  params = jax.tree.map(lambda a: a.astype(jnp.float16), _params("dense", "lecun"))
  g = jax.tree.map(lambda a: (a * 1e-4).astype(jnp.float16), params)
  for tx in (optax.adam(1e-2), gsgd_jax.gsgd_adam(1e-2, structure=gsgd_jax.infer_structure(params))):
    state = tx.init(params)
    finite = []
    for _ in range(3):
      u, state = tx.update(g, state, params)
      finite.append(all(bool(jnp.isfinite(a).all()) for a in jax.tree.leaves(u)))
    assert not all(finite), tx


def test_flax_mixed_precision_traces_and_trains():
  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      for _ in range(2):
        x = nn.relu(nn.Dense(16, dtype=jnp.bfloat16, param_dtype=jnp.float32)(x))
      return nn.Dense(3, dtype=jnp.bfloat16, param_dtype=jnp.float32)(x)

  x, y = _data("dense")
  model = MLP()
  params = model.init(jax.random.PRNGKey(0), x[:1])["params"]
  apply = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
  s = gsgd_jax.trace_structure(apply, params, x[:2])
  assert len(s.chains) == 1 and len(s.chains[0].layers) == 3 and not s.fallback
  tx = gsgd_jax.gsgd(0.05, momentum=0.9, structure=s)
  loss = lambda p: jnp.mean((apply(p, x).astype(jnp.float32) - y) ** 2)  # noqa: E731
  state = tx.init(params)
  p = params
  for _ in range(20):
    u, state = tx.update(jax.grad(loss)(p), state, p)
    p = optax.apply_updates(p, u)
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(p))
  assert float(loss(p)) < 0.9 * float(loss(params))


@pytest.mark.parametrize("dtype,match", [(jnp.int32, "floating-point"),
                                         (jnp.complex64, "floating-point")])
def test_integer_and_complex_params_are_refused(dtype, match):
  params = jax.tree.map(lambda a: (a * 10).astype(dtype), _params("dense", "lecun"))
  for build in (gsgd_jax.infer_structure, lambda p: gsgd_jax.gsgd(0.1).init(p)):
    with pytest.raises(ValueError, match=match):
      build(params)
