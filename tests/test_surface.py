"""Every public optimizer is the chain of public transforms its docstring spells out, update for
update, at the default coordinates and with the paper's settings (and with weight decay,
momentum, Nesterov, per-path scales between the two)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gsgd_jax

pytestmark = pytest.mark.usefixtures("fast_compiles")

C = gsgd_jax.PathCoordinates
COORDINATES = {"default": C(), "paper": gsgd_jax.PAPER, "half_balance": C(balance=0.5),
               "no_guard": C(min_ratio=None, fanout_exponent=0.5)}


def _problem():
  rng = np.random.default_rng(0)
  widths = (3, 5, 4, 2)
  params = {f"Dense_{l}": {"kernel": jnp.asarray(rng.normal(size=(a, b)) * np.sqrt(2 / a),
                                                 jnp.float32),
                           "bias": jnp.asarray(0.1 * rng.normal(size=b), jnp.float32)}
            for l, (a, b) in enumerate(zip(widths[:-1], widths[1:]))}
  params["scale"] = jnp.ones(2)  # a leaf outside G-space
  x = jnp.asarray(rng.normal(size=(16, 3)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(16, 2)), jnp.float32)

  def loss(p):
    h = x
    for l in range(3):
      h = h @ p[f"Dense_{l}"]["kernel"] + p[f"Dense_{l}"]["bias"]
      h = jax.nn.relu(h) if l < 2 else h
    return jnp.mean((h * p["scale"] - y) ** 2)

  return params, loss


def _steps(tx, params, loss, n=3):
  state, out = tx.init(params), []
  for _ in range(n):
    u, state = tx.update(jax.grad(loss)(params), state, params)
    out.append(u)
    params = optax.apply_updates(params, u)
  return out


def _pairs(s, c):
  lr, mom, wd = 0.05, 0.9, 1e-3
  pg = lambda wd=None: gsgd_jax.to_path_gradients(s, wd, coordinates=c)  # noqa: E731
  al = lambda: gsgd_jax.allocate_path_updates(s, coordinates=c)  # noqa: E731
  return {
      "gsgd": (gsgd_jax.gsgd(lr, structure=s, coordinates=c),
               optax.chain(pg(), optax.scale_by_learning_rate(lr), al())),
      "gsgd_momentum_wd": (
          gsgd_jax.gsgd(lr, mom, weight_decay=wd, structure=s, coordinates=c),
          optax.chain(pg(wd), optax.trace(mom), optax.scale_by_learning_rate(lr), al())),
      "gsgd_nesterov": (
          gsgd_jax.gsgd(lr, mom, nesterov=True, structure=s, coordinates=c),
          optax.chain(pg(), optax.trace(mom, nesterov=True), optax.scale_by_learning_rate(lr),
                      al())),
      "gsgd_adam": (gsgd_jax.gsgd_adam(1e-2, 0.8, 0.99, 1e-7, structure=s, coordinates=c),
                    optax.chain(pg(), optax.adam(1e-2, 0.8, 0.99, 1e-7), al())),
      "g_space_clip_adam": (
          gsgd_jax.g_space(optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2)),
                           structure=s, coordinates=c),
          optax.chain(pg(), optax.clip_by_global_norm(1.0), optax.adam(1e-2), al())),
  }


@pytest.mark.parametrize("coords", list(COORDINATES))
@pytest.mark.parametrize("opt", ["gsgd", "gsgd_momentum_wd", "gsgd_nesterov", "gsgd_adam",
                                 "g_space_clip_adam"])
def test_optimizer_is_its_documented_chain(opt, coords):
  params, loss = _problem()
  s = gsgd_jax.infer_structure(params)
  tx, chained = _pairs(s, COORDINATES[coords])[opt]
  for a, b in zip(_steps(tx, params, loss), _steps(chained, params, loss)):
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_bare_blocks_compose_to_the_bare_optimizer():
  """Without structure= each block aligns its own skeleton to the init params: the same one."""
  params, loss = _problem()
  bare = gsgd_jax.gsgd(0.05, momentum=0.9)
  chained = optax.chain(gsgd_jax.to_path_gradients(), optax.trace(0.9),
                        optax.scale_by_learning_rate(0.05), gsgd_jax.allocate_path_updates())
  with pytest.warns(UserWarning, match="inferred from parameter names"):
    a = _steps(bare, params, loss)
  for x, y in zip(a, _steps(chained, params, loss)):
    jax.tree.map(np.testing.assert_array_equal, x, y)


def test_paper_coordinates_are_sgd_on_path_values():
  """With PAPER and no guard hit, one step moves every basis-path value by -lr dL/dv."""
  params, loss = _problem()
  s = gsgd_jax.infer_structure(params)
  tx = gsgd_jax.gsgd(1e-3, structure=s, coordinates=gsgd_jax.PAPER)
  (u,) = _steps(tx, params, loss, n=1)
  v0 = gsgd_jax.basis_path_values(s, params)
  v1 = gsgd_jax.basis_path_values(s, optax.apply_updates(params, u))
  dv = gsgd_jax.path_gradients(s, params, jax.grad(loss)(params))
  mask = gsgd_jax.basis_path_mask(s, params)
  for name in ("Dense_0", "Dense_1", "Dense_2"):
    m = np.asarray(mask[name]["kernel"])
    np.testing.assert_allclose(np.asarray(v1[name]["kernel"])[m],
                               np.asarray(v0[name]["kernel"] - 1e-3 * dv[name]["kernel"])[m],
                               rtol=2e-4, atol=1e-6)
