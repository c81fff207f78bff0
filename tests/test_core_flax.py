"""Flax integration (linen TrainState, nnx.Optimizer), layer ordering, and error messages."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state
from sklearn.datasets import load_digits

import gsgd_jax

# Several tests use the bare gsgd(lr) on plain chains: its one note is expected.
pytestmark = [pytest.mark.usefixtures("fast_compiles"),
              pytest.mark.filterwarnings("ignore:gsgd_jax. no structure given:UserWarning")]


@pytest.fixture(scope="module")
def digits():
  d = load_digits()
  x = (d.data / 16.0).astype(np.float32)
  return jnp.asarray(x[:512]), jnp.asarray(d.target[:512])


class LinenMLP(nn.Module):
  depth: int = 3
  width: int = 32

  @nn.compact
  def __call__(self, x):
    for _ in range(self.depth):
      x = nn.relu(nn.Dense(self.width)(x))
    return nn.Dense(10)(x)


def _xent(logits, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@pytest.mark.parametrize("make_tx", [lambda s: gsgd_jax.gsgd(0.05, momentum=0.9, structure=s),
                                     lambda s: gsgd_jax.gsgd_adam(3e-3, structure=s)],
                         ids=["gsgd", "adam"])
def test_linen_train_state_loop_reduces_loss(digits, make_tx):
  """flax's default init, the one documented call (a structure built from the params)."""
  x, y = digits
  model = LinenMLP()
  params = model.init(jax.random.PRNGKey(0), x[:1])["params"]
  structure = gsgd_jax.infer_structure(params)  # skeleton aligned to these weights
  state = train_state.TrainState.create(apply_fn=model.apply, params=params,
                                        tx=make_tx(structure))

  @jax.jit
  def step(state):
    def loss_fn(p):
      return _xent(state.apply_fn({"params": p}, x), y)
    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads=grads), loss

  losses = []
  for _ in range(60):
    state, loss = step(state)
    losses.append(float(loss))
  assert np.isfinite(losses).all()
  assert losses[-1] < 0.5 * losses[0]


class NnxMLP(nnx.Module):
  def __init__(self, widths, rngs):
    self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(widths[:-1], widths[1:])])

  def __call__(self, x):
    for i, layer in enumerate(self.layers):
      x = layer(x)
      if i < len(self.layers) - 1:
        x = nnx.relu(x)
    return x


def test_nnx_optimizer_loop_reduces_loss(digits):
  x, y = digits
  model = NnxMLP((64, 32, 32, 10), nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  structure = gsgd_jax.infer_structure(state)  # default init, aligned skeleton
  assert structure.chains[0].widths == (64, 32, 32, 10)
  optimizer = nnx.Optimizer(model, gsgd_jax.gsgd(0.05, momentum=0.9, structure=structure),
                            wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(lambda m: _xent(m(x), y))(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer)) for _ in range(60)]
  assert losses[-1] < 0.5 * losses[0]


def test_nnx_sequential_and_wrapped_params_order():
  model = nnx.Sequential(*[m for i in range(12) for m in (
      nnx.Linear(3 if i == 0 else 5, 5 if i < 11 else 2, rngs=nnx.Rngs(i)), nnx.relu)][:-1])
  wrapped = nnx.state(model, nnx.Param)
  s1 = gsgd_jax.infer_structure(wrapped)
  kernels = [layer.kernel for layer in s1.chains[0].layers]
  assert kernels == [("layers", 2 * i, "kernel") for i in range(12)]
  plain = jax.tree.map(lambda v: v, wrapped)
  assert gsgd_jax.infer_structure(plain) == s1
  # the G-space views keep nnx wrappers and work on them
  values = gsgd_jax.basis_path_values(s1, wrapped)
  assert jax.tree.structure(values) == jax.tree.structure(wrapped)


def test_linen_dense_10_after_dense_9():
  model = LinenMLP(depth=11, width=4)
  params = model.init(jax.random.PRNGKey(0), jnp.ones((1, 3)))["params"]
  s = gsgd_jax.infer_structure(params)
  assert [l.kernel[0] for l in s.chains[0].layers] == [f"Dense_{i}" for i in range(12)]
  assert s.chains[0].widths == (3,) + (4,) * 11 + (10,)


def test_chain_structure_explicit_order_and_fallback():
  params = {"enc": {"kernel": jnp.ones((3, 5)), "bias": jnp.zeros(5)},
            "dec": {"kernel": jnp.ones((5, 2))},
            "temperature": jnp.ones(())}
  s = gsgd_jax.chain_structure(params, [["enc/kernel", ("dec", "kernel")]])
  assert [l.kernel for l in s.chains[0].layers] == [("enc", "kernel"), ("dec", "kernel")]
  assert s.chains[0].layers[0].bias == ("enc", "bias")
  assert s.fallback == (("temperature",),)
  assert "temperature" in s.summary()


# ------------------------------------------------------------------------------------------------
# Bad input: clear errors naming the parameter path and the fix
# ------------------------------------------------------------------------------------------------

def test_error_shapes_do_not_chain():
  params = {"Dense_0": {"kernel": jnp.ones((3, 4))}, "Dense_1": {"kernel": jnp.ones((5, 2))}}
  with pytest.raises(ValueError, match=r"Dense_0/kernel.*4 outputs.*Dense_1/kernel.*5 inputs"):
    gsgd_jax.infer_structure(params)
  with pytest.raises(ValueError, match="Dense_1/kernel"):
    gsgd_jax.gsgd(0.1).init(params)


def test_error_structure_does_not_match_params():
  params = {"Dense_0": {"kernel": jnp.ones((3, 4))}, "Dense_1": {"kernel": jnp.ones((4, 2))}}
  s = gsgd_jax.infer_structure(params)
  other = {"Dense_0": {"kernel": jnp.ones((3, 6))}, "Dense_1": {"kernel": jnp.ones((6, 2))}}
  tx = gsgd_jax.gsgd(0.1, structure=s)
  with pytest.raises(ValueError, match=r"Dense_0/kernel.*shape \(3, 6\).*expects \(3, 4\)"):
    tx.init(other)
  renamed = {"a": params["Dense_0"], "b": params["Dense_1"]}
  with pytest.raises(ValueError, match=r"expects parameter 'Dense_0/kernel'"):
    tx.update(renamed, tx.init(params), renamed)
  with pytest.raises(ValueError, match="Kernel 'nope/kernel' is not in the params"):
    gsgd_jax.chain_structure(params, [["nope/kernel"]])
  with pytest.raises(ValueError, match="appears in two places"):
    gsgd_jax.chain_structure(params, [["Dense_0/kernel", "Dense_1/kernel"], ["Dense_1/kernel"]])


def test_error_unsupported_leaves_when_gspace_demanded():
  params = {"Dense_0": {"kernel": jnp.ones((3, 4))}, "Dense_1": {"kernel": jnp.ones((4, 2))},
            "LayerNorm_0": {"scale": jnp.ones(2)}}
  with pytest.raises(ValueError, match=r"LayerNorm_0/scale.*fallback"):
    gsgd_jax.gsgd(0.1, fallback="error").init(params)
  # A tree without kernels is a legitimate optax input: weight space, one warning at init.
  with pytest.warns(UserWarning, match="nothing is in G-space"):
    gsgd_jax.gsgd(0.1).init({"w": jnp.ones(3)})
  with pytest.raises(ValueError, match="nothing is in G-space.*leaves: w"):
    gsgd_jax.gsgd(0.1, fallback="error").init({"w": jnp.ones(3)})


@pytest.mark.parametrize("lr", [0.0, -0.1])
def test_error_learning_rate(lr):
  with pytest.raises(ValueError, match="learning_rate must be positive"):
    gsgd_jax.gsgd(lr)
  with pytest.raises(ValueError, match="learning_rate must be positive"):
    gsgd_jax.gsgd_adam(lr)


def test_error_zero_skeleton_weight_and_nan_gradients():
  params = {"Dense_0": {"kernel": jnp.ones((3, 4))}, "Dense_1": {"kernel": jnp.ones((4, 2))}}
  bad = {"Dense_0": {"kernel": jnp.ones((3, 4)).at[1, 1].set(0.0)}, "Dense_1": params["Dense_1"]}
  modulo = gsgd_jax.infer_structure(bad, skeleton="modulo")
  with pytest.raises(ValueError, match=r"Skeleton weight Dense_0/kernel\[\(1, 1\)\] is .*reset_skeleton"):
    gsgd_jax.gsgd(0.1, structure=modulo).init(bad)
  gsgd_jax.gsgd(0.1).init(bad)  # the aligned skeleton of the bare call avoids the zero weight
  ok = {"Dense_0": {"kernel": jnp.ones((3, 4)).at[0, 1].set(0.0)}, "Dense_1": params["Dense_1"]}
  gsgd_jax.gsgd(0.1, structure=modulo).init(ok)  # a zero non-skeleton weight is fine
  grads = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan), params)
  with pytest.raises(ValueError, match="Gradient of Dense_0/kernel has 1 non-finite"):
    gsgd_jax.check_gradients(grads)
  # inside the transform NaN propagates (visible to optax.apply_if_finite), never hidden
  tx = gsgd_jax.gsgd(0.1)
  u, _ = tx.update(grads, tx.init(params), params)
  assert not all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(u))


def test_error_missing_params_in_update():
  params = {"Dense_0": {"kernel": jnp.ones((3, 4))}, "Dense_1": {"kernel": jnp.ones((4, 2))}}
  tx = gsgd_jax.gsgd(0.1)
  with pytest.raises(ValueError, match="needs the current params"):
    tx.update(params, tx.init(params))


def test_error_conv_kernel_unreadable_taps():
  with pytest.raises(ValueError, match=r"'x/kernel'.*cannot be read as taps"):
    gsgd_jax.Layer(("x", "kernel"), None, (10, 4), (3,))


def test_warning_on_tiny_skeleton_paths():
  model = LinenMLP(depth=4, width=64)
  params = model.init(jax.random.PRNGKey(0), jnp.ones((1, 40)))["params"]
  # the modulo skeleton: the warning names the one call that fixes it
  with pytest.warns(UserWarning, match=r"structure = gsgd_jax.infer_structure\(params\)"):
    gsgd_jax.gsgd(0.1, structure=gsgd_jax.infer_structure(params, skeleton="modulo")).init(params)
  import warnings
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    gsgd_jax.gsgd(0.1, structure=gsgd_jax.infer_structure(params)).init(params)
    modulo = gsgd_jax.infer_structure(params, skeleton="modulo")
    gsgd_jax.gsgd(0.1, structure=modulo).init(gsgd_jax.reset_skeleton(modulo, params))
