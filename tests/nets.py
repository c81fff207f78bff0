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
