"""Tiny networks shared by the tests: plain-dict MLPs with a matching apply function."""

import jax
import jax.numpy as jnp


def mlp_params(widths, bias=True, key=0, dtype=jnp.float64, skeleton_sign=True):
  """Random MLP params ``Dense_0..Dense_{L-1}`` with weights away from zero."""
  key = jax.random.PRNGKey(key)
  params = {}
  for l, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
    key, k1, k2, k3 = jax.random.split(key, 4)
    mag = jax.random.uniform(k1, (a, b), minval=0.4, maxval=1.2)
    sign = jnp.where(jax.random.uniform(k3, (a, b)) < 0.3, -1.0, 1.0)
    layer = {"kernel": (mag * sign / jnp.sqrt(a) * 1.5).astype(dtype)}
    if bias:
      layer["bias"] = (0.3 * jax.random.normal(k2, (b,))).astype(dtype)
    params[f"Dense_{l}"] = layer
  return params


def mlp_apply(params, x):
  L = len(params)
  for l in range(L):
    d = params[f"Dense_{l}"]
    x = x @ d["kernel"] + d.get("bias", 0.0)
    if l < L - 1:
      x = jax.nn.relu(x)
  return x


def regression_batch(d_in, d_out, n=32, key=1, dtype=jnp.float64):
  k1, k2 = jax.random.split(jax.random.PRNGKey(key))
  return (jax.random.normal(k1, (n, d_in)).astype(dtype),
          jax.random.normal(k2, (n, d_out)).astype(dtype))


def mse_loss(apply_fn, x, y):
  return lambda p: jnp.mean((apply_fn(p, x) - y) ** 2)


# Small flax linen models for the library's tests (the lab has its own; library tests do not
# import the lab). He-normal hidden kernels, as the lab's models use.
import flax.linen as nn  # noqa: E402

_he_normal = nn.initializers.he_normal()


class MLP(nn.Module):
  """ReLU MLP ``Dense_0 .. Dense_{len(features)}`` on flattened inputs."""
  features: tuple
  num_classes: int
  use_bias: bool = True

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.reshape((x.shape[0], -1))
    for f in self.features:
      x = nn.relu(nn.Dense(f, use_bias=self.use_bias, kernel_init=_he_normal)(x))
    return nn.Dense(self.num_classes, use_bias=self.use_bias)(x)


class CNN1D(nn.Module):
  """1-D ReLU convnet ``Conv_i`` (SAME padding), global average pool, ``Dense_0`` head."""
  channels: tuple = (8, 8)
  num_classes: int = 10
  kernel_size: int = 3

  @nn.compact
  def __call__(self, x, train: bool = False):
    if x.ndim == 2:
      x = x[..., None]
    for c in self.channels:
      x = nn.relu(nn.Conv(c, (self.kernel_size,), padding="SAME", kernel_init=_he_normal)(x))
    return nn.Dense(self.num_classes)(jnp.mean(x, axis=1))


def digits(seed: int = 0):
  """scikit-learn's bundled 8x8 digits, standardized: ``(x_train, y_train, x_test, y_test)``."""
  import numpy as np
  from sklearn.datasets import load_digits

  d = load_digits()
  x = (d.data / 16.0).astype(np.float32)
  x = (x - x.mean(0)) / (x.std(0) + 1e-6)
  rng = np.random.default_rng(seed)
  idx = rng.permutation(len(x))
  n = int(0.8 * len(x))
  return x[idx[:n]], d.target[idx[:n]], x[idx[n:]], d.target[idx[n:]]
