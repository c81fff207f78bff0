"""Multi-device checks, run in a subprocess by ``tests/test_sharding.py`` (8 simulated CPU devices).

``XLA_FLAGS=--xla_force_host_platform_device_count=8`` must be set before JAX initializes, so this
runs as its own process. Each case builds params and a batch sharded over a mesh and prints one
JSON line with:

* ``update_norm_err`` / ``update_err``: ``tx.update`` (jitted, on the mesh) against ``tx.update``
  on one device, from the same gradients: the largest ``|u_mesh - u_one| / |u_one|`` over the
  leaves (<= 1e-6), and elementwise, ``max|u_mesh - u_one| / max|u_one|`` (<= 1e-5);
* ``step_err`` / ``step_norm_err``: a whole jitted train step (forward, backward, update) on the
  mesh against the same step on one device, elementwise as above and as ``|du| / |u|`` per leaf;
  ``grad_err``: the same elementwise measure for the gradients, whose float32 sums run in another
  order over a split batch (this is where the step's differences come from);
* ``*_specs_bad``: leaves of the updates, of the new params and of the optimizer state (after two
  steps) whose sharding is not the input param's (state leaves without a parameter counterpart,
  such as Adam's step count, must be replicated), and ``recompiled``: whether a third step still
  compiled a new executable (the outputs' shardings must feed back into the step).

Exits with status 1 if a check fails. ``python tests/_sharded_check.py [case ...]`` runs some.
"""

from __future__ import annotations

import json
import os
import sys
import time

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import gsgd_jax  # noqa: E402
import nets as models  # noqa: E402

# Same gradients: |u_mesh - u_one| / |u_one| per leaf <= 1e-6 (elementwise <= 1e-5: a row sum over
# a kernel split on its out axis adds partial sums in another order, and the skeleton-only path
# gradient y = x - (sum of the other x through its edge) is a difference that cancels).
UPDATE_TOL, UPDATE_ELEM_TOL = 1e-6, 1e-5
# Whole step: the float32 gradients of a split batch already differ by ~4e-7 (grad_err).
STEP_TOL = 1e-5
OPTIMIZERS = {
    "gsgd": lambda: gsgd_jax.gsgd(0.05),
    "gsgd_momentum": lambda: gsgd_jax.gsgd(0.05, momentum=0.9),
    "gsgd_adam": lambda: gsgd_jax.gsgd_adam(1e-3),
}


def mesh_of(shape, names, explicit=False):
  kind = AxisType.Explicit if explicit else AxisType.Auto
  return jax.make_mesh(shape, names, axis_types=(kind,) * len(names))


def mlp_specs(params, model_parallel: bool):
  """Dense kernels ``(in, out)`` split alternately on ``out`` and on ``in`` over 'model'."""
  def spec(path, x):
    if not model_parallel:
      return P()
    layer, kind = path[0].key, path[1].key
    even = int(layer.split("_")[1]) % 2 == 0
    if kind == "kernel":  # P("model") == P("model", None), in JAX's normalized form: outputs
      return P(None, "model") if even else P("model")  # come back with it (no recompilation)
    return P("model") if even else P()  # the bias follows the kernel's out axis
  return jax.tree_util.tree_map_with_path(spec, params)


def conv_specs(params):
  """Conv kernels ``(k, in, out)`` split on the out-channel axis, the head replicated."""
  def spec(path, x):
    if path[0].key.startswith("Conv"):
      return P(None, None, "model") if x.ndim == 3 else P("model")
    return P()
  return jax.tree_util.tree_map_with_path(spec, params)


def problem(kind: str):
  key = jax.random.PRNGKey(0)
  if kind == "mlp":
    model = models.MLP(features=(64, 32, 32), num_classes=10)
    x = jax.random.normal(jax.random.PRNGKey(1), (32, 16))
  else:
    model = models.CNN1D(channels=(16, 16), num_classes=10)
    x = jax.random.normal(jax.random.PRNGKey(1), (32, 12))
  params = model.init(key, x[:1])["params"]
  structure = gsgd_jax.infer_structure(params)
  params = gsgd_jax.reset_skeleton(structure, params)
  y = jnp.arange(x.shape[0]) % 10
  return model, params, x, y


def make_step(model, tx):
  def loss_fn(p, x, y):
    logits = model.apply({"params": p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def step(p, s, x, y):
    loss, g = jax.value_and_grad(loss_fn)(p, x, y)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, u, g, loss

  return jax.jit(step)


def equivalent(a, sharding) -> bool:
  return a.sharding.is_equivalent_to(sharding, a.ndim)


def state_bad(state, params, shardings):
  """Paths of state leaves whose sharding is not their parameter's (or not replicated)."""
  pdef = jax.tree.structure(params)
  bad = []
  nodes = jax.tree_util.tree_flatten_with_path(
      state, is_leaf=lambda t: jax.tree.structure(t) == pdef)[0]
  for kp, node in nodes:
    if jax.tree.structure(node) == pdef:  # a params-shaped buffer: trace, mu, nu
      for (kp2, a), sh in zip(jax.tree_util.tree_flatten_with_path(node)[0], jax.tree.leaves(shardings)):
        if not equivalent(a, sh):
          bad.append(f"{jax.tree_util.keystr(kp + kp2)}: {a.sharding.spec} != {sh.spec}")
    elif hasattr(node, "sharding") and not node.sharding.is_fully_replicated:
      bad.append(f"{jax.tree_util.keystr(kp)}: {node.sharding} (not replicated)")
  return bad


def tree_bad(tree, shardings):
  return [f"{jax.tree_util.keystr(kp)}: {a.sharding.spec} != {sh.spec}"
          for (kp, a), sh in zip(jax.tree_util.tree_flatten_with_path(tree)[0], jax.tree.leaves(shardings))
          if not equivalent(a, sh)]


def max_rel_err(a_tree, b_tree) -> float:
  """Largest ``max|a - b| / max|b|`` over the leaves."""
  errs = [0.0]
  for a, b in zip(jax.tree.leaves(a_tree), jax.tree.leaves(b_tree)):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    errs.append(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))
  return float(max(errs))


def norm_rel_err(a_tree, b_tree) -> float:
  """Largest ``|a - b| / |b|`` (Frobenius norms) over the leaves."""
  errs = [0.0]
  for a, b in zip(jax.tree.leaves(a_tree), jax.tree.leaves(b_tree)):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    errs.append(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))
  return float(max(errs))


_REFERENCE = {}


def reference(kind, opt):
  """One train step and one ``tx.update`` on one device (unsharded arrays on device 0)."""
  if (kind, opt) not in _REFERENCE:
    model, params, x, y = problem(kind)
    tx = OPTIMIZERS[opt]()
    _, _, u, g, loss = make_step(model, tx)(params, tx.init(params), x, y)
    u_same = jax.jit(tx.update)(g, tx.init(params), params)[0]
    _REFERENCE[kind, opt] = dict(u=u, g=g, loss=float(loss), u_same=u_same)
  return _REFERENCE[kind, opt]


def train_case(name, kind, opt, mesh, specs_fn):
  model, params, x, y = problem(kind)
  tx = OPTIMIZERS[opt]()
  ref = reference(kind, opt)
  shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs_fn(params))
  p = jax.device_put(params, shardings)
  s = tx.init(p)
  u_same = jax.jit(tx.update)(jax.device_put(ref["g"], shardings), s, p)[0]
  xs = jax.device_put(x, NamedSharding(mesh, P("data")))
  ys = jax.device_put(y, NamedSharding(mesh, P("data")))
  step = make_step(model, tx)
  p, s, u, g, loss = step(p, s, xs, ys)
  result = dict(case=name, update_err=max_rel_err(u_same, ref["u_same"]),
                update_norm_err=norm_rel_err(u_same, ref["u_same"]),
                step_err=max_rel_err(u, ref["u"]), step_norm_err=norm_rel_err(u, ref["u"]),
                grad_err=max_rel_err(g, ref["g"]), loss_err=abs(float(loss) - ref["loss"]),
                update_specs_bad=tree_bad(u, shardings) + tree_bad(u_same, shardings))
  p, s, *_ = step(p, s, xs, ys)  # second step: from the outputs of the first
  compiled = step._cache_size()
  result.update(param_specs_bad=tree_bad(p, shardings), state_specs_bad=state_bad(s, p, shardings))
  step(p, s, xs, ys)
  result["recompiled"] = step._cache_size() != compiled
  return result


def update_case(name, opt, mesh):
  """``tx.update`` alone, jitted, on params split over an Explicit mesh (no model forward)."""
  model, params, x, y = problem("mlp")
  tx = OPTIMIZERS[opt]()
  ref = reference("mlp", opt)
  shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), mlp_specs(params, True))
  with jax.set_mesh(mesh):
    p, g = jax.device_put(params, shardings), jax.device_put(ref["g"], shardings)
    u, s = jax.jit(tx.update)(g, tx.init(p), p)
  return dict(case=name, update_err=max_rel_err(u, ref["u_same"]),
              update_norm_err=norm_rel_err(u, ref["u_same"]), step_err=0.0,
              step_norm_err=0.0, grad_err=0.0, loss_err=0.0, update_specs_bad=tree_bad(u, shardings),
              param_specs_bad=[], state_specs_bad=state_bad(s, p, shardings), recompiled=False)


def main() -> int:
  assert jax.device_count() == 8, jax.devices()
  mp = mesh_of((4, 2), ("data", "model"))
  dp = mesh_of((8,), ("data",))
  cases = []
  for opt in OPTIMIZERS:
    cases.append((f"mlp/{opt}/mesh(4,2)", lambda opt=opt: train_case(
        f"mlp/{opt}/mesh(4,2)", "mlp", opt, mp, lambda p: mlp_specs(p, True))))
  # data-parallel only: one optimizer is enough (the model-parallel cases cover all three)
  cases.append(("mlp/gsgd_momentum/mesh(8,)", lambda: train_case(
      "mlp/gsgd_momentum/mesh(8,)", "mlp", "gsgd_momentum", dp, lambda p: mlp_specs(p, False))))
  cases.append(("cnn1d/gsgd_momentum/mesh(4,2)", lambda: train_case(
      "cnn1d/gsgd_momentum/mesh(4,2)", "cnn", "gsgd_momentum", mp, conv_specs)))
  cases.append(("mlp/gsgd_momentum/explicit-mesh(8,)", lambda: train_case(
      "mlp/gsgd_momentum/explicit-mesh(8,)", "mlp", "gsgd_momentum",
      mesh_of((8,), ("data",), explicit=True), lambda p: mlp_specs(p, False))))
  cases.append(("update/gsgd_adam/explicit-mesh(4,2)", lambda: update_case(
      "update/gsgd_adam/explicit-mesh(4,2)", "gsgd_adam",
      mesh_of((4, 2), ("data", "model"), explicit=True))))
  only = sys.argv[1:]
  ok = True
  for name, fn in cases:
    if only and name not in only:
      continue
    t0 = time.perf_counter()
    r = fn()
    r["seconds"] = round(time.perf_counter() - t0, 2)
    r["ok"] = bool(r["update_norm_err"] <= UPDATE_TOL and r["update_err"] <= UPDATE_ELEM_TOL
                   and r["step_err"] <= STEP_TOL and r["step_norm_err"] <= STEP_TOL
                   and r["loss_err"] <= 1e-5 and not r["update_specs_bad"]
                   and not r["param_specs_bad"] and not r["state_specs_bad"] and not r["recompiled"])
    ok &= r["ok"]
    print(json.dumps(r), flush=True)
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
