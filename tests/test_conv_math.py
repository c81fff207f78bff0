"""Brute-force and invariance checks of G-space on traced convolutional and residual nets (float64).

For a ReLU CNN the loss depends on the weights only through the path values of its channel graph
(edges ``(tap, in_channel, out_channel)``), so with the structure found by ``trace_structure``:
the enumerated basis paths are ``m - H`` independent products, ``dL/dw = J^T dL/dv`` has an exact
least-squares solution, the inverse chain rule reproduces it, and one G-SGD step lands exactly on
``v - lr dL/dv``.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gsgd_jax
from brute import at_pivots, enumerate_basis_paths, flat, flat_jacobian, path_value_fn
from test_tracing import PlainNet, ResNet, resnet_chains

pytestmark = pytest.mark.usefixtures("fast_compiles")


class Conv1dGap(nn.Module):
  """1-D: odd kernel (SAME, bias), even kernel (stride 2, VALID), global average pooling."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(2, (3,))(x))
    x = nn.relu(nn.Conv(3, (2,), strides=2, padding="VALID")(x))
    return nn.Dense(2)(jnp.mean(x, axis=1))


class Conv2dFlatten(nn.Module):
  """2-D: 3x3 SAME with bias, 2x2 stride 2 with asymmetric padding and no bias, flatten."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(3, (3, 3))(x))
    x = nn.relu(nn.Conv(2, (2, 2), strides=2, padding=((1, 0), (0, 1)), use_bias=False)(x))
    return nn.Dense(2)(x.reshape((x.shape[0], -1)))


class Conv2dDilatedPool(nn.Module):
  """2-D: dilated 2x2, average pooling, 3x3 with strides (2, 1) VALID, global average pooling."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(2, (2, 2), kernel_dilation=2)(x))
    x = nn.avg_pool(x, (2, 2))
    x = nn.relu(nn.Conv(3, (3, 3), strides=(2, 1), padding="VALID")(x))
    return nn.Dense(2)(jnp.mean(x, axis=(1, 2)))


CASES = {
    "conv1d_gap": (Conv1dGap, (3, 6, 2), [(3,), (2,), ()]),
    "conv2d_flatten": (Conv2dFlatten, (3, 5, 5, 1), [(3, 3), (2, 2), (3, 3)]),
    "conv2d_dilated_pool": (Conv2dDilatedPool, (3, 5, 5, 1), [(2, 2), (3, 3), ()]),
}


def _away_from_zero(params, seed):
  """Random weights with magnitudes in [0.4, 1.2] / sqrt(fan_in) * 1.5 and random signs."""
  rng = np.random.default_rng(seed)

  def draw(path, x):
    if path[-1] == "bias":
      return jnp.asarray(0.3 * rng.standard_normal(x.shape))
    fan_in = int(np.prod(x.shape[:-1]))
    sign = np.where(rng.uniform(size=x.shape) < 0.3, -1.0, 1.0)
    return jnp.asarray(rng.uniform(0.4, 1.2, x.shape) * sign / np.sqrt(fan_in) * 1.5)

  return jax.tree_util.tree_map_with_path(lambda kp, x: draw([k.key for k in kp], x), params)


def _setup(model, in_shape, seed=0):
  rng = np.random.default_rng(seed + 100)
  x = jnp.asarray(rng.standard_normal(in_shape))
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)["params"]
  params = _away_from_zero(shapes, seed)
  apply_fn = lambda p, inputs: model.apply({"params": p}, inputs)
  y = jnp.asarray(rng.standard_normal(jax.eval_shape(apply_fn, params, x).shape))
  loss = lambda p: jnp.mean((apply_fn(p, x) - y) ** 2)
  return params, apply_fn, x, loss


@pytest.mark.parametrize("skeleton", ["aligned", "modulo"])
@pytest.mark.parametrize("name", list(CASES))
def test_conv_chain_brute_force(x64, name, skeleton):
  model, in_shape, taps = CASES[name]
  params, apply_fn, x, loss = _setup(model(), in_shape)
  s = gsgd_jax.trace_structure(apply_fn, params, x, skeleton=skeleton)
  assert len(s.chains) == 1 and not s.fallback
  assert [l.taps_shape for l in s.chains[0].layers] == taps
  # aligned: skeleton edges at each channel pair's largest tap, off the centre for some pairs
  # (brute.py reads Chain.taps); modulo: the paper's centre taps
  chain = s.chains[0]
  moved = [chain.layer_taps(li) is not None for li in range(len(chain.layers))]
  assert any(moved) if skeleton == "aligned" else (chain.taps is None and not any(moved))

  paths = enumerate_basis_paths(s)
  assert len(paths) == s.num_basis_paths == s.num_edges - s.num_hidden
  vf = path_value_fn(s, paths)
  v = np.asarray(vf(params))
  jac = flat_jacobian(vf, params)                      # dv/dw, (paths, m)
  assert np.linalg.matrix_rank(jac) == s.num_basis_paths
  values = gsgd_jax.basis_path_values(s, params)
  np.testing.assert_allclose(at_pivots(s, paths, values), v, rtol=1e-12)

  # The loss depends on the weights only through these path values: dL/dw = J^T dL/dv exactly.
  grads = jax.grad(loss)(params)
  g = flat(grads)
  dldv, *_ = np.linalg.lstsq(jac.T, g, rcond=None)
  np.testing.assert_allclose(jac.T @ dldv, g, atol=1e-10 * np.abs(g).max())
  ours = gsgd_jax.path_gradients(s, params, grads)
  np.testing.assert_allclose(at_pivots(s, paths, ours), dldv, rtol=1e-8,
                             atol=1e-9 * np.abs(dldv).max())

  # One G-SGD step lands exactly on v - lr dL/dv (skeleton paths change by up to 50%).
  lr = 0.5 / np.abs(dldv / v).max()
  target = v - lr * dldv
  tx = gsgd_jax.gsgd(lr, structure=s, coordinates=gsgd_jax.PathCoordinates(normalize=False, min_ratio=None))
  new = optax.apply_updates(params, tx.update(grads, tx.init(params), params)[0])
  err = np.linalg.norm(np.asarray(vf(new)) - target) / np.linalg.norm(target)
  assert err < 1e-6


def _runner(tx, loss):
  """``run(params, steps)`` for ``tx`` on ``loss``, compiled once."""
  grad = jax.grad(loss)

  @jax.jit
  def step(params, state):
    updates, state = tx.update(grad(params), state, params)
    return optax.apply_updates(params, updates), state

  def run(params, steps):
    state = tx.init(params)
    for _ in range(steps):
      params, state = step(params, state)
    return params

  return run


MODELS = {  # model, input shape, learning rate (large steps that keep the ReLUs alive)
    "plainnet": (PlainNet, (3, 5, 5, 1), 3e-3),
    "resnet": (ResNet, (3, 5, 5, 1), 1e-3),
}


@pytest.mark.parametrize("opt,steps", [
    (lambda s, lr: gsgd_jax.gsgd(lr, structure=s), 1),
    (lambda s, lr: gsgd_jax.gsgd(lr / 2, momentum=0.9, structure=s), 3),
], ids=["gsgd", "momentum"])
@pytest.mark.parametrize("name", list(MODELS))
def test_traced_structure_is_rescaling_invariant(x64, name, opt, steps):
  model, in_shape, lr = MODELS[name]
  params, apply_fn, x, loss = _setup(model(), in_shape)
  s = gsgd_jax.trace_structure(apply_fn, params, x)
  if name == "resnet":
    assert [[("/".join(l.kernel)) for l in c.layers] for c in s.chains] == resnet_chains()
  twin, _ = gsgd_jax.random_rescale(s, params, jax.random.PRNGKey(7), max_factor=5.0)
  assert not np.allclose(flat(twin), flat(params))
  np.testing.assert_allclose(apply_fn(twin, x), apply_fn(params, x), rtol=1e-12)

  run = _runner(opt(s, lr), loss)
  a, b = run(params, steps), run(twin, steps)
  out_a, out_b = apply_fn(a, x), apply_fn(b, x)
  assert not np.allclose(out_a, apply_fn(params, x))  # the steps did something
  assert np.ptp(out_a, axis=0).max() > 1e-3 * np.abs(out_a).max()  # and did not kill the ReLUs
  np.testing.assert_allclose(out_b, out_a, rtol=1e-8, atol=1e-10)

  # Plain SGD on the same pair of equivalent networks does not stay equivalent.
  run = _runner(optax.sgd(lr), loss)
  sa, sb = run(params, steps), run(twin, steps)
  rel = np.abs(apply_fn(sa, x) - apply_fn(sb, x)).max() / np.abs(apply_fn(sa, x)).max()
  assert rel > 1e-4


def test_a_chain_through_a_skip_is_not_invariant(x64):
  """The check above can fail: the stem output also feeds the skip, so it cannot start a chain."""
  params, apply_fn, x, _ = _setup(ResNet(), (3, 5, 5, 1))
  wrong = gsgd_jax.chain_structure(params, [["stem/kernel"] + resnet_chains()[0]])
  twin, _ = gsgd_jax.random_rescale(wrong, params, jax.random.PRNGKey(7), max_factor=5.0)
  out, out_twin = apply_fn(params, x), apply_fn(twin, x)
  assert np.abs(out_twin - out).max() > 1e-3 * np.abs(out).max()
