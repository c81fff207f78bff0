"""Path-SGD: scalings against brute-force path enumeration, rescaling invariance, jit, training."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import nets as models
from gsgd_jax.path_sgd import path_norm, path_sgd, path_sgd_scales, scale_by_path_norm
from gsgd_jax import infer_structure

pytestmark = pytest.mark.usefixtures("fast_compiles")


# ------------------------------------------------------------------------------------------------
# Tiny networks as plain dicts (numpy init: no random-kernel compilation)
# ------------------------------------------------------------------------------------------------

def mlp_params(widths, bias, seed=0, dtype=np.float64):
  rng = np.random.default_rng(seed)
  params = {}
  for l, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
    layer = {"kernel": (rng.uniform(0.3, 1.2, (a, b)) * rng.choice([-1, 1], (a, b))
                        / np.sqrt(a)).astype(dtype)}
    if bias:
      layer["bias"] = (0.3 * rng.normal(size=b)).astype(dtype)
    params[f"Dense_{l}"] = layer
  return params


def conv_params(channels, kernel_size, num_classes, seed=0, dtype=np.float64):
  """Params of ``models.CNN1D(channels, num_classes, kernel_size)`` (with biases)."""
  rng = np.random.default_rng(seed)
  params = {}
  c_in = 1
  for i, c in enumerate(channels):
    params[f"Conv_{i}"] = {
        "kernel": (rng.normal(size=(kernel_size, c_in, c))
                   / np.sqrt(kernel_size * c_in)).astype(dtype),
        "bias": (0.2 * rng.normal(size=c)).astype(dtype)}
    c_in = c
  params["Dense_0"] = {
      "kernel": (rng.normal(size=(c_in, num_classes)) / np.sqrt(c_in)).astype(dtype),
      "bias": (0.2 * rng.normal(size=num_classes)).astype(dtype)}
  return params


def as_chain(params):
  """``(kernels as (T, in, out), biases)`` in layer order (names sort in data-flow order here)."""
  kernels, biases = [], []
  for name in sorted(params):
    k = np.asarray(params[name]["kernel"])
    kernels.append(k.reshape(-1, k.shape[-2], k.shape[-1]))
    biases.append(np.asarray(params[name]["bias"]) if "bias" in params[name] else None)
  return kernels, biases


def brute_force(kernels, biases):
  """Enumerates every path (from an input or a bias unit to an output) and every edge on it.

  Returns ``(kernel_gammas, bias_gammas, path_norm)`` where the gamma of an edge is the sum, over
  the paths through it, of the product of the squared weights of the path's *other* edges.
  """
  L = len(kernels)
  widths = [kernels[0].shape[1]] + [k.shape[2] for k in kernels]
  taps = [k.shape[0] for k in kernels]
  kg = [np.zeros_like(k) for k in kernels]
  bg = [None if b is None else np.zeros_like(b) for b in biases]
  total = 0.0
  # start = 0: from an input node; start = s >= 1: from the bias unit of layer s - 1.
  for start in range(L + 1):
    if start > 0 and biases[start - 1] is None:
      continue
    for nodes in itertools.product(*(range(w) for w in widths[start:])):
      for ts in itertools.product(*(range(t) for t in taps[start:])):
        edges = []  # (weight, setter)
        if start > 0:
          edges.append((biases[start - 1][nodes[0]], ("b", start - 1, nodes[0])))
        for k, l in enumerate(range(start, L)):
          idx = (ts[k], nodes[k], nodes[k + 1])
          edges.append((kernels[l][idx], ("k", l, idx)))
        sq = [float(w) ** 2 for w, _ in edges]
        total += math.prod(sq)
        for p, (_, (kind, l, idx)) in enumerate(edges):
          others = math.prod(sq[:p] + sq[p + 1:])
          if kind == "k":
            kg[l][idx] += others
          else:
            bg[l][idx] += others
  return kg, bg, total


# ------------------------------------------------------------------------------------------------
# Scalings against enumeration
# ------------------------------------------------------------------------------------------------

NETS = {
    "mlp_bias": lambda: mlp_params((3, 4, 3, 2), bias=True),
    "mlp_nobias": lambda: mlp_params((3, 4, 3, 2), bias=False, seed=1),
    "conv1d": lambda: conv_params((2, 3), kernel_size=3, num_classes=2, seed=2),
}


@pytest.mark.parametrize("net", sorted(NETS))
def test_scales_match_enumeration(x64, net):
  params = NETS[net]()
  kernels, biases = as_chain(params)
  kg, bg, total = brute_force(kernels, biases)
  jk = [jnp.asarray(k) for k in kernels]
  jb = [None if b is None else jnp.asarray(b) for b in biases]
  ks, bs = path_sgd_scales(jk, jb)
  for l in range(len(kernels)):
    assert ks[l].dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(ks[l]), kg[l], rtol=1e-10, atol=0)
    if biases[l] is None:
      assert bs[l] is None
    else:
      np.testing.assert_allclose(np.asarray(bs[l]), bg[l], rtol=1e-10, atol=0)
  np.testing.assert_allclose(float(path_norm(jk, jb)), total, rtol=1e-10)

  # The transform finds the layers in the params tree and divides the gradients by gamma.
  grads = jax.tree.map(jnp.ones_like, params)
  tx = scale_by_path_norm()
  scaled, _ = tx.update(grads, tx.init(params), params)
  for l, name in enumerate(sorted(params)):
    np.testing.assert_allclose(np.asarray(scaled[name]["kernel"]).reshape(kg[l].shape),
                               1.0 / kg[l], rtol=1e-10)
    if "bias" in params[name]:
      np.testing.assert_allclose(np.asarray(scaled[name]["bias"]), 1.0 / bg[l], rtol=1e-10)


def test_bias_edges_count_as_paths(x64):
  """A bias enters gamma_in of its node: edges after it are scaled by more than without."""
  with_b = mlp_params((2, 3, 1), bias=True)
  kernels, biases = as_chain(with_b)
  kernels = [jnp.asarray(k) for k in kernels]
  k1, _ = path_sgd_scales(kernels, [jnp.asarray(b) for b in biases])
  k0, _ = path_sgd_scales(kernels, [None, None])
  b0 = with_b["Dense_0"]["bias"]
  np.testing.assert_allclose(np.asarray(k1[1] - k0[1])[0, :, 0], b0 ** 2, rtol=1e-10)
  np.testing.assert_allclose(np.asarray(k1[0]), np.asarray(k0[0]), rtol=1e-12)


def test_shape_errors():
  with pytest.raises(ValueError, match="expected \\(T, in, out\\)"):
    path_sgd_scales([jnp.ones((2, 3))], [None])
  with pytest.raises(ValueError, match="inputs"):
    path_sgd_scales([jnp.ones((1, 2, 3)), jnp.ones((1, 4, 1))], [None, None])
  with pytest.raises(ValueError, match="Bias 0"):
    path_sgd_scales([jnp.ones((1, 2, 3))], [jnp.ones(2)])
  tx = scale_by_path_norm()
  params = mlp_params((2, 2), bias=False, dtype=np.float32)
  with pytest.raises(ValueError, match="needs the params"):
    tx.update(params, tx.init(params))


# ------------------------------------------------------------------------------------------------
# Invariance under positive node rescaling
# ------------------------------------------------------------------------------------------------

def rescale(params, factors):
  """Hidden node ``j`` of layer ``l``: edges in (and bias) times ``c``, edges out over ``c``."""
  names = sorted(params)
  out = jax.tree.map(lambda x: x, params)
  for l, c in enumerate(factors):
    a, b = out[names[l]], out[names[l + 1]]
    a["kernel"] = a["kernel"] * c
    if "bias" in a:
      a["bias"] = a["bias"] * c
    b["kernel"] = b["kernel"] / c[:, None]
  return out


def _apply_fn(net):
  if net == "conv1d":
    model = models.CNN1D(channels=(2, 3), num_classes=2, kernel_size=3)
    return lambda p, x: model.apply({"params": p}, x), (6, 10)
  return lambda p, x: models.MLP((4, 3), 2, use_bias="bias" in p["Dense_0"]).apply(
      {"params": p}, x), (6, 3)


@pytest.mark.parametrize("net", sorted(NETS))
def test_update_invariant_under_rescaling(x64, net):
  params = jax.tree.map(jnp.asarray, NETS[net]())
  apply, x_shape = _apply_fn(net)
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(size=x_shape))
  y = jnp.asarray(rng.normal(size=(x_shape[0], 2)))
  loss = lambda p: jnp.mean((apply(p, x) - y) ** 2)
  hidden = [params[n]["kernel"].shape[-1] for n in sorted(params)[:-1]]
  factors = [jnp.asarray(rng.uniform(0.2, 5.0, size=h)) for h in hidden]
  rescaled = rescale(params, factors)
  np.testing.assert_allclose(loss(rescaled), loss(params), rtol=1e-12)

  def step(tx, p):
    updates, _ = tx.update(jax.grad(loss)(p), tx.init(p), p)
    return optax.apply_updates(p, updates)

  x_eval = jnp.asarray(rng.normal(size=x_shape))
  for tx in (path_sgd(0.05), path_sgd(0.05, momentum=0.9)):
    a, b = apply(step(tx, params), x_eval), apply(step(tx, rescaled), x_eval)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-8, rtol=0)
    assert float(loss(step(tx, params))) < float(loss(params))
  sgd = optax.sgd(0.05)
  a, b = apply(step(sgd, params), x_eval), apply(step(sgd, rescaled), x_eval)
  assert float(jnp.max(jnp.abs(a - b))) > 1e-4  # plain SGD depends on the parametrization


# ------------------------------------------------------------------------------------------------
# Structure handling, jit, training
# ------------------------------------------------------------------------------------------------

def test_structure_fallback_and_jit():
  params = mlp_params((3, 4, 2), bias=True, dtype=np.float32)
  params["norm"] = {"scale": np.ones(4, np.float32)}  # not a kernel: passes through unscaled
  params = jax.tree.map(jnp.asarray, params)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
  structure = infer_structure(params)
  tx_auto, tx_given = path_sgd(0.1, momentum=0.5), path_sgd(0.1, momentum=0.5, structure=structure)
  state = tx_auto.init(params)
  u_auto, _ = tx_auto.update(grads, state, params)
  u_given, _ = tx_given.update(grads, tx_given.init(params), params)
  u_jit, state2 = jax.jit(tx_auto.update)(grads, state, params)
  for other in (u_given, u_jit):
    jax.tree.map(lambda u, v: np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-6),
                 u_auto, other)
  np.testing.assert_allclose(np.asarray(u_auto["norm"]["scale"]), -0.05, rtol=1e-6)
  assert jax.tree.structure(state2) == jax.tree.structure(state)


def test_init_reads_no_values():
  shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                        mlp_params((3, 4, 2), bias=True, dtype=np.float32))
  assert isinstance(scale_by_path_norm().init(shapes), optax.EmptyState)


def test_training_on_digits_reduces_loss():
  x_train, y_train, x_val, y_val = models.digits(seed=0)
  model = models.MLP(features=(32, 32), num_classes=10)
  rng = np.random.default_rng(0)
  params = {}
  for l, (a, b) in enumerate([(64, 32), (32, 32), (32, 10)]):
    params[f"Dense_{l}"] = {"kernel": jnp.asarray(rng.normal(size=(a, b)) * np.sqrt(2.0 / a),
                                                  jnp.float32),
                            "bias": jnp.zeros(b, jnp.float32)}
  tx = path_sgd(0.05, momentum=0.9)
  state = tx.init(params)

  def loss_fn(p, x, y):
    logits = model.apply({"params": p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def step(p, s, x, y):
    loss, g = jax.value_and_grad(loss_fn)(p, x, y)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  x_all, y_all = jnp.asarray(x_train), jnp.asarray(y_train)
  initial = float(loss_fn(params, x_all, y_all))
  rng = np.random.default_rng(1)
  for epoch in range(5):
    order = rng.permutation(len(x_all))
    for i in range(0, len(order) - 63, 64):
      b = order[i:i + 64]
      params, state, _ = step(params, state, x_all[b], y_all[b])
  final = float(loss_fn(params, x_all, y_all))
  assert np.isfinite(final) and final < 0.5 * initial, (initial, final)
  val_acc = float(jnp.mean(jnp.argmax(model.apply({"params": params}, jnp.asarray(x_val)), -1) == y_val))
  assert val_acc > 0.8, val_acc
