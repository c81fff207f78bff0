"""verify_structure: name-inferred structures of non-chain models are caught, traced ones pass."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gsgd_jax

pytestmark = pytest.mark.usefixtures("fast_compiles")


class ResidualMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(8, name="Dense_0")(x))
    h = nn.Dense(8, name="Dense_2")(nn.relu(nn.Dense(8, name="Dense_1")(x)))
    return nn.Dense(3, name="Dense_3")(nn.relu(x + h))


class ParallelBranches(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(6, name="Dense_0")(x))
    a = nn.relu(nn.Dense(6, name="Dense_1")(x))
    b = nn.relu(nn.Dense(6, name="Dense_2")(x))
    return nn.Dense(3, name="Dense_3")(a + b)


class SharedLayer(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(6, name="Dense_0")(x))
    shared = nn.Dense(6, name="Dense_1")
    x = nn.relu(shared(nn.relu(shared(x))))
    return nn.Dense(3, name="Dense_2")(x)


class SkipCNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3), name="Conv_0")(x))
    y = nn.Conv(4, (3, 3), name="Conv_2")(nn.relu(nn.Conv(4, (3, 3), name="Conv_1")(x)))
    x = nn.relu(x + y)
    return nn.Dense(3, name="Dense_0")(jnp.mean(x, axis=(1, 2)))


class GeluMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(6, name="Dense_0")(x))
    x = nn.gelu(nn.Dense(6, name="Dense_1")(x))
    return nn.Dense(3, name="Dense_2")(x)


class PlainMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    for i in range(3):
      x = nn.relu(nn.Dense(6, name=f"Dense_{i}")(x))
    return nn.Dense(3, name="Dense_3")(x)


class PlainCNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3), name="Conv_0")(x))
    x = nn.relu(nn.Conv(4, (3, 3), name="Conv_1")(x))
    return nn.Dense(3, name="Dense_0")(jnp.mean(x, axis=(1, 2)))


def _setup(model, shape):
  x = jax.random.normal(jax.random.PRNGKey(1), shape)
  params = model.init(jax.random.PRNGKey(0), x)["params"]
  return params, (lambda p, inputs: model.apply({"params": p}, inputs)), x


@pytest.mark.parametrize("model,shape,where", [
    (ResidualMLP, (5, 4), "Dense_0"),
    (ParallelBranches, (5, 4), "Dense_"),
    (SharedLayer, (5, 4), "Dense_"),
    (SkipCNN, (2, 6, 6, 2), "Conv_"),
    (GeluMLP, (5, 4), "Dense_1/kernel"),
], ids=["residual_mlp", "parallel_branches", "shared_layer", "cnn_skip", "gelu"])
def test_name_inferred_structure_of_a_non_chain_is_caught(model, shape, where):
  params, apply_fn, x = _setup(model(), shape)
  inferred = gsgd_jax.infer_structure(params)
  with pytest.raises(ValueError, match=rf"does not fit this model.*{where}.*chain 0"):
    gsgd_jax.verify_structure(inferred, apply_fn, params, x)
  if model is not GeluMLP:  # (tracing ends the chain at the GELU; covered in test_tracing.py)
    traced = gsgd_jax.trace_structure(apply_fn, params, x, unsupported="fallback")
    gsgd_jax.verify_structure(traced, apply_fn, params, x)


@pytest.mark.parametrize("model,shape", [(PlainMLP, (5, 4)), (PlainCNN, (2, 6, 6, 2))],
                         ids=["mlp", "cnn"])
def test_plain_chains_pass_both_ways(model, shape):
  params, apply_fn, x = _setup(model(), shape)
  for s in (gsgd_jax.infer_structure(params), gsgd_jax.trace_structure(apply_fn, params, x)):
    gsgd_jax.verify_structure(s, apply_fn, params, x)


def test_residual_mlp_error_names_the_layer_and_size():
  params, apply_fn, x = _setup(ResidualMLP(), (5, 4))
  with pytest.raises(ValueError) as e:
    gsgd_jax.verify_structure(gsgd_jax.infer_structure(params), apply_fn, params, x)
  msg = str(e.value)
  assert "'Dense_0/kernel' and 'Dense_1/kernel'" in msg and "trace_structure" in msg
  rel = float(msg.split("output by ")[1].split(" ")[0])
  assert rel > 1e-2


def test_float64_tolerance_is_tight(x64):
  params, apply_fn, x = _setup(PlainMLP(), (5, 4))
  params = jax.tree.map(lambda a: a.astype(jnp.float64), params)
  s = gsgd_jax.infer_structure(params)
  gsgd_jax.verify_structure(s, apply_fn, params, x.astype(jnp.float64))
  # a perturbation of 1e-6 relative is far below float32's tolerance but caught in float64
  def nudged(p, inputs):
    out = apply_fn(p, inputs)
    moved = not np.allclose(np.asarray(p["Dense_1"]["kernel"]), np.asarray(params["Dense_1"]["kernel"]))
    return out * (1 + 1e-6) if moved else out
  with pytest.raises(ValueError, match="Dense_0/kernel' and 'Dense_1/kernel"):
    gsgd_jax.verify_structure(s, nudged, params, x.astype(jnp.float64))


def test_structure_none_says_once_what_it_inferred():
  params, _, _ = _setup(ResidualMLP(), (5, 4))
  tx = gsgd_jax.gsgd(0.1)
  with pytest.warns(UserWarning, match=r"inferred from parameter names: chain Dense_0 -> "
                                       r"Dense_1 -> Dense_2 -> Dense_3.*verify_structure"):
    tx.init(params)
  import warnings
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    tx.init(params)  # the same transform again: no new note
  assert not [w for w in caught if "parameter names" in str(w.message)]


def test_trace_nnx_structure_for_a_residual_nnx_model():
  from flax import nnx
  import optax

  class Residual(nnx.Module):
    def __init__(self, rngs):
      self.d0 = nnx.Linear(4, 8, rngs=rngs)
      self.d1 = nnx.Linear(8, 8, rngs=rngs)
      self.d2 = nnx.Linear(8, 8, rngs=rngs)
      self.d3 = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
      x = nnx.relu(self.d0(x))
      return self.d3(nnx.relu(x + self.d2(nnx.relu(self.d1(x)))))

  model = Residual(nnx.Rngs(0))
  x = jax.random.normal(jax.random.PRNGKey(1), (6, 4))
  s = gsgd_jax.trace_nnx_structure(model, x)
  assert [[l.kernel for l in c.layers] for c in s.chains] == [[("d1", "kernel"), ("d2", "kernel")]]
  graphdef, state = nnx.split(model, nnx.Param)
  apply_fn = lambda st, inputs: nnx.merge(graphdef, st)(inputs)  # noqa: E731
  gsgd_jax.verify_structure(s, apply_fn, state, x)
  with pytest.raises(ValueError, match="does not fit.*'d0/kernel' and 'd1/kernel'"):
    gsgd_jax.verify_structure(gsgd_jax.infer_structure(state), apply_fn, state, x)
  optimizer = nnx.Optimizer(model, gsgd_jax.gsgd(0.05, momentum=0.9, structure=s), wrt=nnx.Param)
  y = jnp.arange(6) % 3
  loss = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()  # noqa: E731
  before = float(loss(model))
  for _ in range(5):
    grads = nnx.grad(loss)(model)
    optimizer.update(model, grads)
  assert float(loss(model)) < before


def test_bad_inputs_get_clear_errors():
  params = {"Dense_0": {"kernel": jnp.ones((3, 4)), "bias": jnp.zeros(4)},
            "Dense_1": {"kernel": jnp.ones((4, 2))}}
  ints = jax.tree.map(lambda a: a.astype(jnp.int32), params)
  with pytest.raises(ValueError, match=r"'Dense_0/kernel' has dtype int32.*floating-point"):
    gsgd_jax.gsgd(0.1, structure=gsgd_jax.infer_structure(params, skeleton="modulo")).init(ints)
  cplx = jax.tree.map(lambda a: a.astype(jnp.complex64), params)
  with pytest.raises(ValueError, match=r"dtype complex64"):
    gsgd_jax.gsgd(0.1).init(cplx)
  s = gsgd_jax.infer_structure(params)
  tx = gsgd_jax.gsgd(0.1, structure=s)
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  del grads["Dense_1"]
  with pytest.raises(ValueError, match=r"In the gradients: .*expects parameter 'Dense_1/kernel'"):
    tx.update(grads, state, params)
