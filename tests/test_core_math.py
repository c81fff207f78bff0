"""Brute-force and invariance checks of the G-space maths on Dense chains (float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gsgd_jax
from gsgd_jax import pathspace
from brute import (at_pivots, balanced_sigmas, enumerate_basis_paths, flat, flat_jacobian,
                   path_value_fn)
from nets import mlp_apply, mlp_params, mse_loss, regression_batch

pytestmark = pytest.mark.usefixtures("fast_compiles")

WIDTHS = {
    "equal": (3, 4, 4, 4, 2),
    "growing": (2, 3, 5, 7, 2),
    "shrinking": (7, 5, 3, 2, 3),
    "mixed": (3, 2, 6, 3, 4, 2),
    # classes that end (7 -> 2) and new heads after a narrow set; widths > 2x the previous one
    "wide_jumps": (2, 2, 7, 2, 5, 3),
    "single_layer": (3, 2),
}


def _setup(widths, bias):
  params = mlp_params(widths, bias=bias)
  x, y = regression_batch(widths[0], widths[-1])
  loss = mse_loss(mlp_apply, x, y)
  structure = gsgd_jax.infer_structure(params)
  paths = enumerate_basis_paths(structure)
  return params, x, y, loss, structure, paths


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("name", list(WIDTHS))
def test_basis_paths_match_enumeration(x64, name, bias):
  params, _, _, _, structure, paths = _setup(WIDTHS[name], bias)
  # m - H paths, all independent (the log-Jacobian has full rank).
  assert len(paths) == structure.num_basis_paths
  mask = gsgd_jax.basis_path_mask(structure, params)
  assert int(sum(np.sum(m) for m in jax.tree.leaves(mask))) == structure.num_basis_paths
  vf = path_value_fn(structure, paths)
  jac = flat_jacobian(vf, params)
  assert np.linalg.matrix_rank(jac) == structure.num_basis_paths
  # values stored at pivots equal the explicit products
  values = gsgd_jax.basis_path_values(structure, params)
  np.testing.assert_allclose(at_pivots(structure, paths, values), np.asarray(vf(params)), rtol=1e-12)


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("name", list(WIDTHS))
def test_inverse_chain_rule_and_exact_step(x64, name, bias):
  params, _, _, loss, structure, paths = _setup(WIDTHS[name], bias)
  vf = path_value_fn(structure, paths)
  v = np.asarray(vf(params))
  jac = flat_jacobian(vf, params)                     # dv/dw, (paths, m)
  g = flat(jax.grad(loss)(params))
  dldv, *_ = np.linalg.lstsq(jac.T, g, rcond=None)    # dL/dw = J^T dL/dv
  np.testing.assert_allclose(jac.T @ dldv, g, atol=1e-10 * np.abs(g).max())

  ours = gsgd_jax.path_gradients(structure, params, jax.grad(loss)(params))
  np.testing.assert_allclose(at_pivots(structure, paths, ours), dldv,
                             rtol=1e-8, atol=1e-9 * np.abs(dldv).max())

  # A step large enough that skeleton paths change by up to 50%.
  ratio = np.abs(dldv / v)
  lr = 0.5 / ratio.max()
  target = v - lr * dldv
  tx = gsgd_jax.gsgd(lr, structure=structure, coordinates=gsgd_jax.PathCoordinates(normalize=False, min_ratio=None))
  updates, _ = tx.update(jax.grad(loss)(params), tx.init(params), params)
  new = optax.apply_updates(params, updates)
  err = np.linalg.norm(np.asarray(vf(new)) - target) / np.linalg.norm(target)
  assert err < 1e-6
  # Normalized coordinates u = v / s: the same exact step with learning rate lr * s^2.
  (s,) = np.asarray(pathspace.path_scales(structure, params))
  if structure.num_hidden:
    assert abs(np.log(s)) > 0.05  # these weights are not at the reference init: s != 1
  tx = gsgd_jax.gsgd(lr / s**2, structure=structure,
                     coordinates=gsgd_jax.PathCoordinates(balance=0.0, min_ratio=None))
  updates, _ = tx.update(jax.grad(loss)(params), tx.init(params), params)
  new = optax.apply_updates(params, updates)
  assert np.linalg.norm(np.asarray(vf(new)) - target) / np.linalg.norm(target) < 1e-6
  # Per-path scales (balance b): v' = v - lr sigma^2 dL/dv, sigma = s^(1-b) sigma_bal^b, with
  # sigma_bal computed here from the enumerated skeleton paths.
  _, metas = enumerate_basis_paths(structure, meta=True)
  sigma_bal = balanced_sigmas(metas, params)
  if structure.num_hidden:
    assert np.ptp(np.log(sigma_bal)) > 0.1  # the per-path scales really differ
  for b in (1.0, 0.5):
    sigma2 = (s ** (1 - b) * sigma_bal ** b) ** 2
    lr_b = 0.5 / np.abs(sigma2 * dldv / v).max()
    target_b = v - lr_b * sigma2 * dldv
    tx = gsgd_jax.gsgd(lr_b, structure=structure, coordinates=gsgd_jax.PathCoordinates(balance=b, min_ratio=None))
    updates, _ = tx.update(jax.grad(loss)(params), tx.init(params), params)
    new = optax.apply_updates(params, updates)
    assert np.linalg.norm(np.asarray(vf(new)) - target_b) / np.linalg.norm(target_b) < 1e-6, b

  # The first-order allocation dw = J^+ dv misses the target: the exactness test can fail.
  if structure.num_hidden:
    dw1, *_ = np.linalg.lstsq(jac, target - v, rcond=None)
    leaves, treedef = jax.tree.flatten(params)
    sizes = np.cumsum([x.size for x in leaves])[:-1]
    parts = [x + d.reshape(x.shape) for x, d in zip(leaves, np.split(dw1, sizes))]
    first_order = np.asarray(vf(jax.tree.unflatten(treedef, parts)))
    assert np.linalg.norm(first_order - target) / np.linalg.norm(target) > 3e-5  # exact: < 1e-6


def _rescaled(structure, params, seed=3):
  return gsgd_jax.random_rescale(structure, params, jax.random.PRNGKey(seed), max_factor=5.0)[0]


def _run(tx, params, loss, steps):
  state = tx.init(params)
  update = jax.jit(tx.update)
  grad = jax.jit(jax.grad(loss))
  for _ in range(steps):
    updates, state = update(grad(params), state, params)
    params = optax.apply_updates(params, updates)
  return params


@pytest.mark.parametrize("opt,steps", [
    (lambda **kw: gsgd_jax.gsgd(0.05, **kw), 1),
    (lambda **kw: gsgd_jax.gsgd(0.02, momentum=0.9, weight_decay=1e-3, **kw), 4),
    (lambda **kw: gsgd_jax.gsgd(0.02, momentum=0.9, nesterov=True, **kw), 4),
    (lambda **kw: gsgd_jax.gsgd_adam(1e-2, **kw), 4),
    (lambda **kw: gsgd_jax.g_space(optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.05)),
                                   **kw), 3),
    (lambda **kw: gsgd_jax.gsgd(0.05, coordinates=gsgd_jax.PAPER, **kw), 2),
    (lambda **kw: gsgd_jax.gsgd(0.05, momentum=0.9, coordinates=gsgd_jax.PathCoordinates(balance=0.0), **kw), 2),
    (lambda **kw: gsgd_jax.gsgd_adam(1e-2, weight_decay=1e-3,
                                     coordinates=gsgd_jax.PathCoordinates(balance=0.5), **kw), 2),
], ids=["gsgd", "momentum_wd", "nesterov", "adam", "clip", "unnormalized", "global_scale",
        "adam_half_balance"])
@pytest.mark.parametrize("skeleton", ["modulo", "aligned"])
@pytest.mark.parametrize("name", ["equal", "mixed"])
def test_invariance_under_rescaling(x64, opt, steps, name, skeleton):
  params, x, _, loss, structure, _ = _setup(WIDTHS[name], True)
  twin = _rescaled(structure, params)
  np.testing.assert_allclose(mlp_apply(twin, x), mlp_apply(params, x), rtol=1e-12)
  if skeleton == "modulo":  # shapes only: one structure for both
    sm = gsgd_jax.infer_structure(params, skeleton="modulo")
    a = _run(opt(structure=sm), params, loss, steps)
    b = _run(opt(structure=sm), twin, loss, steps)
  else:  # each run's skeleton chosen from its own params: the choice must be invariant too
    sa, sb = gsgd_jax.infer_structure(params), gsgd_jax.infer_structure(twin)
    assert sa == sb and sa.chains[0].skeleton == "aligned"
    a = _run(opt(structure=sa), params, loss, steps)
    b = _run(opt(structure=sb), twin, loss, steps)
  out_a, out_b = mlp_apply(a, x), mlp_apply(b, x)
  assert not np.allclose(out_a, mlp_apply(params, x))  # the step did something
  np.testing.assert_allclose(out_b, out_a, rtol=1e-8, atol=1e-10)
  va = gsgd_jax.basis_path_values(structure, a)
  vb = gsgd_jax.basis_path_values(structure, b)
  np.testing.assert_allclose(flat(vb), flat(va), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("opt", [lambda: optax.sgd(0.05), lambda: optax.adam(1e-2)], ids=["sgd", "adam"])
def test_weight_space_optimizers_are_not_invariant(x64, opt):
  params, x, _, loss, structure, _ = _setup(WIDTHS["equal"], True)
  twin = _rescaled(structure, params)
  a = _run(opt(), params, loss, 1)
  b = _run(opt(), twin, loss, 1)
  rel = np.abs(mlp_apply(a, x) - mlp_apply(b, x)).max() / np.abs(mlp_apply(a, x)).max()
  assert rel > 1e-3


def test_reference_update_formulas_equal_widths(x64):
  """The closed forms of docs/method.md (the reference code's section 4 formulas) (reference code, equal widths, no bias)."""
  params, _, _, loss, structure, _ = _setup((3, 4, 4, 4, 2), False)
  lr = 0.01
  g = jax.grad(loss)(params)
  tx = gsgd_jax.gsgd(lr, structure=gsgd_jax.infer_structure(params, skeleton="modulo"),
                     coordinates=gsgd_jax.PathCoordinates(normalize=False, min_ratio=None))
  new = optax.apply_updates(params, tx.update(g, tx.init(params), params)[0])
  W = [np.asarray(params[f"Dense_{l}"]["kernel"]) for l in range(4)]
  G = [np.asarray(g[f"Dense_{l}"]["kernel"]) for l in range(4)]
  N = [np.asarray(new[f"Dense_{l}"]["kernel"]) for l in range(4)]
  h = 4
  # F(j) for hidden layer 1..3 nodes; B(i) for layer 1..3 nodes
  F = {3: np.array([W[3][i, i % 2] for i in range(h)])}
  F[2] = np.array([W[2][i, i] for i in range(h)]) * F[3]
  F[1] = np.array([W[1][i, i] for i in range(h)]) * F[2]
  B = {1: np.array([W[0][j % 3, j] for j in range(h)])}
  B[2] = B[1] * np.array([W[1][i, i] for i in range(h)])
  B[3] = B[2] * np.array([W[2][i, i] for i in range(h)])
  x = [w * gg for w, gg in zip(W, G)]
  sigma = np.zeros(h)
  for l in (1, 2, 3):
    mask = np.ones_like(W[l], bool)
    for i in range(h):
      mask[i, i % W[l].shape[1]] = False
    sigma += (x[l] * mask).sum(axis=1)
  r = np.array([W[0][i % 3, i] for i in range(h)])
  x_r = np.array([x[0][i % 3, i] for i in range(h)])
  v_s = B[1] * F[1]
  dv_s = (x_r - sigma) / v_s
  R = 1 - lr * dv_s / v_s
  for i in range(h):
    np.testing.assert_allclose(N[0][i % 3, i], r[i] * R[i], rtol=1e-10)
  for a in range(3):
    for j in range(h):
      if a != j % 3:
        np.testing.assert_allclose(N[0][a, j], W[0][a, j] - lr * G[0][a, j] / F[1][j] ** 2, rtol=1e-10)
  Fout = {1: F[2], 2: F[3], 3: np.ones(2)}
  for l in (1, 2, 3):
    for i in range(h):
      for j in range(W[l].shape[1]):
        if j == i % W[l].shape[1]:
          np.testing.assert_allclose(N[l][i, j], W[l][i, j], rtol=1e-12)  # skeleton fixed
        else:
          want = (W[l][i, j] - lr * G[l][i, j] / (B[l][i] * Fout[l][j]) ** 2) / R[i]
          np.testing.assert_allclose(N[l][i, j], want, rtol=1e-10)


def test_reset_skeleton_and_masks(x64):
  params, *_ = _setup((3, 4, 4, 2), True)
  s = gsgd_jax.infer_structure(params, skeleton="modulo")
  reset = gsgd_jax.reset_skeleton(s, params)
  mask = gsgd_jax.skeleton_mask(s, params)
  for (p, w), (_, m), (_, w0) in zip(jax.tree_util.tree_leaves_with_path(reset),
                                     jax.tree_util.tree_leaves_with_path(mask),
                                     jax.tree_util.tree_leaves_with_path(params)):
    np.testing.assert_array_equal(np.where(m, w, 0), np.where(m, 1.0, 0))
    np.testing.assert_array_equal(np.where(m, 0, w), np.where(m, 0, w0))
  k0 = np.asarray(mask["Dense_0"]["kernel"])
  assert k0.sum() == 4 and all(k0[j % 3, j] for j in range(4))
  k1 = np.asarray(mask["Dense_1"]["kernel"])
  np.testing.assert_array_equal(k1, np.eye(4, dtype=bool))
  k2 = np.asarray(mask["Dense_2"]["kernel"])
  assert k2.sum() == 4 and all(k2[i, i % 2] for i in range(4))
  assert s.chains[0].num_skeleton_edges == 2 * 8 - 4  # 2H minus the diagonal of Dense_1


def test_summary_reports_counts():
  params = mlp_params((5, 8, 8, 3), bias=True, dtype=jnp.float32)
  params["norm_scale"] = jnp.ones(3)
  s = gsgd_jax.infer_structure(params)
  text = s.summary()
  assert "m=" in text and "H=16" in text
  m = 5 * 8 + 8 + 8 * 8 + 8 + 8 * 3 + 3
  assert f"m-H={m - 16}" in text
  assert "norm_scale" in text and "fallback" in text
  assert s.fallback == (("norm_scale",),)


def test_chains_processed_together_match_each_alone(x64):
  """Chains share one flat per-node vector: every result equals that of the chain on its own."""
  params = mlp_params((3, 4, 6, 2, 5, 3, 2), bias=True)
  grads = jax.tree.map(lambda p: jnp.cos(3.0 * p) + 0.1, params)
  names = [[f"Dense_{i}/kernel" for i in (0, 1, 2)], [f"Dense_{i}/kernel" for i in (3, 4, 5)]]
  both = gsgd_jax.chain_structure(params, names)
  alone = [gsgd_jax.chain_structure(params, [n]) for n in names]
  dv = jax.tree.map(lambda g: -0.01 * g, grads)
  fns = {
      "values": lambda s: pathspace.path_values(s, params),
      "gradients": lambda s: pathspace.path_gradients(s, params, grads, weight_decay=1e-3),
      "allocate": lambda s: pathspace.allocate(s, params, dv),
  }
  for what, fn in fns.items():
    out = fn(both)
    for n, s in zip(names, alone):
      ref = fn(s)
      for path in n:
        layer = path.split("/")[0]
        for leaf in ("kernel", "bias"):
          np.testing.assert_allclose(out[layer][leaf], ref[layer][leaf], rtol=1e-12, atol=1e-14,
                                     err_msg=f"{what} {layer}/{leaf}")


@pytest.mark.parametrize("name", ["mixed", "wide_jumps"])
def test_smallest_skeleton_path_matches_path_values(x64, name):
  params = mlp_params(WIDTHS[name], bias=True)
  s = gsgd_jax.infer_structure(params)
  values = gsgd_jax.basis_path_values(s, params)
  skel = gsgd_jax.skeleton_mask(s, params)
  basis = gsgd_jax.basis_path_mask(s, params)
  designated = {k: np.abs(np.asarray(values[k]["kernel"]))[np.asarray(skel[k]["kernel"])
                                                          & np.asarray(basis[k]["kernel"])]
                for k in params}
  smallest, where = pathspace.smallest_skeleton_path(s, params)
  want = min(v.min() for v in designated.values() if v.size)
  np.testing.assert_allclose(smallest, want, rtol=1e-12)
  assert designated[where[0]].min() == pytest.approx(smallest, rel=1e-12)
