"""Stacked layers (``nn.scan`` / ``nnx.scan`` over layers): one leaf ``(n, *kernel)`` holds ``n``
layers, and the structure addresses slice ``i`` as ``leaf[i]``. The G-space maths on a stack is
checked against explicit path enumeration and against its unrolled twin (the same layers as
separate leaves), and the invariance check runs on a stack (float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gsgd_jax
from gsgd_jax import pathspace
from gsgd_jax._tree import StackIndex, as_path, path_str
from gsgd_jax.path_sgd import path_sgd
from brute import at_pivots, enumerate_basis_paths, flat, flat_jacobian, path_value_fn
from nets import mlp_apply, mlp_params, mse_loss, regression_batch

pytestmark = pytest.mark.usefixtures("fast_compiles")

WIDTHS = (3, 5, 5, 5, 5, 2)  # Dense_0, three stacked 5x5 layers, Dense_4


def _stacked(bias=True):
  """``(stacked params, unrolled twin params, stacked apply, unrolled apply)``."""
  flat_params = mlp_params(WIDTHS, bias=bias, dtype=jnp.asarray(1.0).dtype)  # f64 under x64
  mid = [flat_params[f"Dense_{l}"] for l in (1, 2, 3)]
  stack = {k: jnp.stack([m[k] for m in mid]) for k in mid[0]}
  params = {"a": flat_params["Dense_0"], "b_stack": stack, "c": flat_params["Dense_4"]}

  def apply(p, x):
    x = jax.nn.relu(x @ p["a"]["kernel"] + p["a"].get("bias", 0.0))

    def layer(h, w):
      return jax.nn.relu(h @ w["kernel"] + w.get("bias", 0.0)), None

    x, _ = jax.lax.scan(layer, x, p["b_stack"])
    return x @ p["c"]["kernel"] + p["c"].get("bias", 0.0)

  return params, flat_params, apply, mlp_apply


def _unstack(tree):
  """A stacked-params-shaped tree as its unrolled twin's tree."""
  out = {"Dense_0": tree["a"], "Dense_4": tree["c"]}
  for i in range(3):
    out[f"Dense_{i + 1}"] = jax.tree.map(lambda a: a[i], tree["b_stack"])
  return out


def test_slice_paths():
  p = as_path("b_stack/kernel[2]")
  assert p == ("b_stack", "kernel", StackIndex(2)) and path_str(p) == "b_stack/kernel[2]"
  s = gsgd_jax.infer_structure(_stacked()[0], skeleton="modulo")
  assert s.stacked == {("b_stack", "kernel"), ("b_stack", "bias")}
  assert s.gspace_paths == {("a", "kernel"), ("a", "bias"), ("b_stack", "kernel"),
                            ("b_stack", "bias"), ("c", "kernel"), ("c", "bias")}
  assert gsgd_jax.BasisPathStructure.from_json(s.to_json()) == s
  twin = gsgd_jax.chain_structure(_stacked()[0], [["a/kernel"] + [
      f"b_stack/kernel[{i}]" for i in range(3)] + ["c/kernel"]], skeleton="modulo")
  assert twin == s


@pytest.mark.parametrize("skeleton", ["modulo", "aligned"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_stack_against_brute_force(x64, bias, skeleton):
  """Basis paths through the slices of a stacked leaf: values, the inverse chain rule (``dL/dw =
  J^T dL/dv`` solved by least squares) and the exact step of the paper's G-SGD."""
  params, _, apply, _ = _stacked(bias)
  x, y = regression_batch(WIDTHS[0], WIDTHS[-1])
  loss = mse_loss(apply, x, y)
  if bias:
    structure = gsgd_jax.infer_structure(params, skeleton=skeleton)
  else:  # no bias: names cannot tell the stack from a convolution, so list the layers
    structure = gsgd_jax.chain_structure(params, [["a/kernel"] + [
        f"b_stack/kernel[{i}]" for i in range(3)] + ["c/kernel"]], skeleton=skeleton)
  assert structure.chains[0].widths == WIDTHS
  paths = enumerate_basis_paths(structure)
  assert len(paths) == structure.num_basis_paths
  vf = path_value_fn(structure, paths)
  v = np.asarray(vf(params))
  jac = flat_jacobian(vf, params)
  assert np.linalg.matrix_rank(jac) == structure.num_basis_paths
  np.testing.assert_allclose(at_pivots(structure, paths, gsgd_jax.basis_path_values(
      structure, params)), v, rtol=1e-12)
  mask = gsgd_jax.basis_path_mask(structure, params)
  assert int(sum(np.sum(m) for m in jax.tree.leaves(mask))) == structure.num_basis_paths

  g = flat(jax.grad(loss)(params))
  dldv, *_ = np.linalg.lstsq(jac.T, g, rcond=None)
  ours = gsgd_jax.path_gradients(structure, params, jax.grad(loss)(params))
  np.testing.assert_allclose(at_pivots(structure, paths, ours), dldv, rtol=1e-8,
                             atol=1e-9 * np.abs(dldv).max())
  lr = 0.5 / np.abs(dldv / v).max()
  tx = gsgd_jax.gsgd(lr, structure=structure,
                     coordinates=gsgd_jax.PathCoordinates(normalize=False, min_ratio=None))
  updates, _ = tx.update(jax.grad(loss)(params), tx.init(params), params)
  new = optax.apply_updates(params, updates)
  target = v - lr * dldv
  assert np.linalg.norm(np.asarray(vf(new)) - target) / np.linalg.norm(target) < 1e-6


@pytest.mark.parametrize("make", [
    lambda s: gsgd_jax.gsgd(0.1, momentum=0.9, weight_decay=1e-3, structure=s),
    lambda s: gsgd_jax.gsgd_adam(1e-2, structure=s),
    lambda s: gsgd_jax.g_space(optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1)),
                               structure=s, coordinates=gsgd_jax.PAPER),
    lambda s: path_sgd(0.1, structure=s),
], ids=["gsgd_momentum_wd", "gsgd_adam", "g_space_clip_paper", "path_sgd"])
def test_stack_equals_its_unrolled_twin(x64, make):
  """Three steps on the stacked params and on the unrolled twin (the same layers as separate
  leaves, the same skeleton): the same updates, to rounding."""
  params, twin, apply, twin_apply = _stacked()
  x, y = regression_batch(WIDTHS[0], WIDTHS[-1])
  s = gsgd_jax.infer_structure(params)
  s_twin = gsgd_jax.infer_structure(twin)
  assert [c.perms for c in s.chains] == [c.perms for c in s_twin.chains]
  tx, tx_twin = make(s), make(s_twin)
  state, state_twin = tx.init(params), tx_twin.init(twin)
  step = jax.jit(lambda p, st: tx.update(jax.grad(mse_loss(apply, x, y))(p), st, p))
  step_twin = jax.jit(lambda p, st: tx_twin.update(jax.grad(mse_loss(twin_apply, x, y))(p), st, p))
  for _ in range(3):
    u, state = step(params, state)
    u_twin, state_twin = step_twin(twin, state_twin)
    for a, b in zip(jax.tree.leaves(_unstack(u)), jax.tree.leaves(u_twin)):
      np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)
    params, twin = optax.apply_updates(params, u), optax.apply_updates(twin, u_twin)


def test_stack_step_is_invariant(x64):
  """One G-SGD step from ``w`` and from a random positive rescaling of ``w`` (hidden units of the
  stacked layers included) gives the same function; SGD's does not."""
  params, _, apply, _ = _stacked()
  x, y = regression_batch(WIDTHS[0], WIDTHS[-1])
  loss = mse_loss(apply, x, y)
  s = gsgd_jax.infer_structure(params)
  scaled, _ = gsgd_jax.random_rescale(s, params, jax.random.PRNGKey(3), max_factor=5.0)
  assert scaled["b_stack"]["kernel"].shape == (3, 5, 5)
  np.testing.assert_allclose(apply(scaled, x), apply(params, x), rtol=1e-10)
  assert not np.allclose(scaled["b_stack"]["kernel"], params["b_stack"]["kernel"])

  def stepped(tx, p):
    u, _ = tx.update(jax.grad(loss)(p), tx.init(p), p)
    return apply(optax.apply_updates(p, u), x)

  tx = gsgd_jax.gsgd(0.05, structure=s)
  np.testing.assert_allclose(stepped(tx, scaled), stepped(tx, params), rtol=1e-8)
  sgd = optax.sgd(0.05)
  assert not np.allclose(stepped(sgd, scaled), stepped(sgd, params), rtol=1e-3)


def test_partial_stack_is_refused():
  params = _stacked()[0]
  with pytest.raises(ValueError, match=r"in G-space whole, every slice 0..n-1"):
    gsgd_jax.chain_structure(params, [["a/kernel", "b_stack/kernel[0]", "b_stack/kernel[1]"]])
  s = gsgd_jax.infer_structure(params)
  wrong = jax.tree.map(lambda a: a, params)
  wrong["b_stack"] = jax.tree.map(lambda a: a[:2], params["b_stack"])
  with pytest.raises(ValueError, match=r"'b_stack/kernel' has shape \(2, 5, 5\) but the "
                                       r"structure holds it as a stack of 3 layers"):
    gsgd_jax.gsgd(0.1, structure=s).init(wrong)


def test_stack_path_values_are_exact_in_float32():
  """The default float32 path: stacked and unrolled give the same basis-path values."""
  params, twin, _, _ = _stacked()
  params = jax.tree.map(lambda a: a.astype(jnp.float32), params)
  twin = jax.tree.map(lambda a: a.astype(jnp.float32), twin)
  v = pathspace.basis_path_values(gsgd_jax.infer_structure(params), params)
  v_twin = pathspace.basis_path_values(gsgd_jax.infer_structure(twin), twin)
  for a, b in zip(jax.tree.leaves(_unstack(v)), jax.tree.leaves(v_twin)):
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_stack_at_the_chain_start_equals_its_twin(x64):
  """Slice 0 is the chain's first layer and the others are not, so the slices need different
  programs: they are evaluated one by one (then stacked), with the same result as the twin."""
  flat_params = mlp_params((5, 5, 5, 5, 2), bias=True, dtype=jnp.float64)
  stack = {k: jnp.stack([flat_params[f"Dense_{l}"][k] for l in range(3)]) for k in ("kernel", "bias")}
  params = {"b_stack": stack, "c": flat_params["Dense_3"]}

  def apply(p, x):
    x, _ = jax.lax.scan(lambda h, w: (jax.nn.relu(h @ w["kernel"] + w["bias"]), None), x,
                        p["b_stack"])
    return x @ p["c"]["kernel"] + p["c"]["bias"]

  x, y = regression_batch(5, 2)
  s = gsgd_jax.infer_structure(params)
  s_twin = gsgd_jax.infer_structure(flat_params)
  assert s.chains[0].widths == s_twin.chains[0].widths == (5, 5, 5, 5, 2)
  tx, tx_twin = gsgd_jax.gsgd(0.1, momentum=0.9, structure=s), gsgd_jax.gsgd(
      0.1, momentum=0.9, structure=s_twin)
  u, _ = tx.update(jax.grad(mse_loss(apply, x, y))(params), tx.init(params), params)
  u_twin, _ = tx_twin.update(jax.grad(mse_loss(mlp_apply, x, y))(flat_params),
                             tx_twin.init(flat_params), flat_params)
  for i in range(3):
    np.testing.assert_allclose(u["b_stack"]["kernel"][i], u_twin[f"Dense_{i}"]["kernel"],
                               rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(u["b_stack"]["bias"][i], u_twin[f"Dense_{i}"]["bias"],
                               rtol=1e-10, atol=1e-14)


def test_conv_stack_with_chosen_taps_equals_its_twin(x64):
  """A scanned stack of convolutions whose skeleton edges sit at each channel pair's largest tap
  (``Chain.taps``, different per slice): the vectorized update takes the taps of every slice as
  arguments and equals the unrolled twin's (3 steps, G-space momentum)."""
  import flax.linen as nn

  class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      return nn.relu(nn.Conv(4, (3,))(x)), None

  class Stacked(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Conv(4, (3,))(x))
      x, _ = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                     length=3)(name="stack")(x, None)
      return nn.Dense(2)(jnp.mean(x, axis=1))

  class Unrolled(nn.Module):
    @nn.compact
    def __call__(self, x):
      for _ in range(4):
        x = nn.relu(nn.Conv(4, (3,))(x))
      return nn.Dense(2)(jnp.mean(x, axis=1))

  x = jax.random.normal(jax.random.PRNGKey(1), (6, 7, 2), jnp.float64)
  y = jax.random.normal(jax.random.PRNGKey(2), (6, 2), jnp.float64)
  params = jax.tree.map(lambda a: a.astype(jnp.float64),
                        Stacked().init(jax.random.PRNGKey(0), x)["params"])
  twin = {"Conv_0": params["Conv_0"], "Dense_0": params["Dense_0"]}
  for i in range(3):
    twin[f"Conv_{i + 1}"] = jax.tree.map(lambda a: a[i], params["stack"]["Conv_0"])
  apply = lambda p, x: Stacked().apply({"params": p}, x)  # noqa: E731
  twin_apply = lambda p, x: Unrolled().apply({"params": p}, x)  # noqa: E731
  s = gsgd_jax.trace_structure(apply, params, x)
  s_twin = gsgd_jax.trace_structure(twin_apply, twin, x)
  chain, chain_twin = s.chains[0], s_twin.chains[0]
  assert len(chain.layers) == 5 and chain.taps == chain_twin.taps
  assert sum(chain.layer_taps(li) is not None for li in (1, 2, 3)) >= 2  # off the centre
  tx, tx_twin = (gsgd_jax.gsgd(0.05, momentum=0.9, structure=st) for st in (s, s_twin))
  loss = lambda f: lambda p: jnp.mean((f(p, x) - y) ** 2)  # noqa: E731
  step = jax.jit(lambda p, st: tx.update(jax.grad(loss(apply))(p), st, p))
  step_twin = jax.jit(lambda p, st: tx_twin.update(jax.grad(loss(twin_apply))(p), st, p))
  state, state_twin = tx.init(params), tx_twin.init(twin)
  for _ in range(3):
    u, state = step(params, state)
    u_twin, state_twin = step_twin(twin, state_twin)
    for i in range(3):
      for k in ("kernel", "bias"):
        np.testing.assert_allclose(u["stack"]["Conv_0"][k][i], u_twin[f"Conv_{i + 1}"][k],
                                   rtol=1e-10, atol=1e-14)
    params, twin = optax.apply_updates(params, u), optax.apply_updates(twin, u_twin)
