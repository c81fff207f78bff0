"""G-SGD on many devices: an MLP on sklearn digits, data-parallel and model-parallel.

The batch is split over the mesh axis ``'data'``; the hidden Dense kernels ``(in, out)`` are split
over ``'model'``, alternately on ``out`` (column-parallel, with their biases) and on ``in``
(row-parallel), as in Megatron-style tensor parallelism. ``gsgd`` needs nothing else: its
updates, its momentum and the new params keep every parameter's sharding. Without accelerators the
script simulates 8 CPU devices (``--xla_force_host_platform_device_count``, set before JAX starts).

Usage::

  python examples/multi_device.py                     # mesh (4, 2), ~10 s on 2 CPU cores
  python examples/multi_device.py --mesh 8 1          # data-parallel only
  python examples/multi_device.py --steps 5 --width 16 --batch 32   # smoke run
"""

from __future__ import annotations

import argparse
import os

# Simulated devices must be requested before JAX initializes its CPU backend.
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
from gsgd_jax.lab import datasets, models  # noqa: E402


def partition_spec(path, leaf, num_layers: int, model_parallel: bool) -> P:
  """Hidden layer ``i``: kernel split on ``out`` for even ``i`` (bias too), on ``in`` for odd ``i``.

  The output layer is split on ``in`` when the last hidden layer was split on ``out``, and
  replicated otherwise; everything is replicated without a ``'model'`` axis.
  """
  name, kind = path[0].key, path[1].key  # ('Dense_3', 'kernel')
  i = int(name.split("_")[1])
  if not model_parallel:
    return P()
  if i == num_layers - 1:  # the output layer
    split_in = (i - 1) % 2 == 0
    return P("model") if kind == "kernel" and split_in else P()
  if i % 2 == 0:  # column-parallel: (in, out/model), bias (out/model,)
    return P(None, "model") if kind == "kernel" else P("model")
  return P("model") if kind == "kernel" else P()  # row-parallel: (in/model, out), bias replicated


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--mesh", type=int, nargs=2, default=(4, 2), metavar=("DATA", "MODEL"),
                 help="devices along 'data' and 'model' (their product: all devices)")
  p.add_argument("--width", type=int, default=256, help="hidden width (divisible by MODEL)")
  p.add_argument("--depth", type=int, default=3, help="hidden layers")
  p.add_argument("--batch", type=int, default=128, help="global batch (divisible by DATA)")
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--lr", type=float, default=0.02)
  p.add_argument("--seed", type=int, default=0)
  a = p.parse_args(argv)

  n_data, n_model = a.mesh
  if n_data * n_model != jax.device_count():
    raise SystemExit(f"--mesh {n_data} {n_model} needs {n_data * n_model} devices, "
                     f"found {jax.device_count()}.")
  # Auto axes: XLA's sharding propagation partitions the computation from the shardings of the
  # inputs. (jax.make_mesh's default in recent JAX is Explicit axes: gsgd works with those too,
  # but flax's Dense then needs out_sharding annotations for a kernel split on `in`.)
  mesh = jax.make_mesh((n_data, n_model), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
  print(f"{jax.device_count()} devices, mesh {dict(mesh.shape)}")

  data = datasets.load_digits_dataset(seed=a.seed)
  model = models.MLP(features=(a.width,) * a.depth, num_classes=data.num_classes)
  params = model.init(jax.random.PRNGKey(a.seed), jnp.asarray(data.x_train[:1]))["params"]
  structure = gsgd_jax.infer_structure(params)
  # The reference initialization: skeleton weights 1, the others scaled down so that the first
  # logits stay moderate.
  params = gsgd_jax.reset_skeleton(structure, params, others_scale=0.25)

  # Place the params: everything else (momentum, updates, new params) follows them.
  specs = jax.tree_util.tree_map_with_path(
      lambda path, x: partition_spec(path, x, a.depth + 1, n_model > 1), params)
  shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
  params = jax.device_put(params, shardings)
  batch_sharding = NamedSharding(mesh, P("data"))

  tx = gsgd_jax.gsgd(a.lr, momentum=0.9, structure=structure)
  opt_state = tx.init(params)  # the momentum buffer is created with the params' shardings

  def loss_fn(params, x, y):
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def train_step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  @jax.jit
  def accuracy(params, x, y):
    return jnp.mean(jnp.argmax(model.apply({"params": params}, x), -1) == y)

  rng = np.random.default_rng(a.seed)
  n = len(data.x_train)
  log_every = max(1, a.steps // 10)
  for step in range(a.steps):
    idx = rng.choice(n, a.batch, replace=False)
    x = jax.device_put(data.x_train[idx], batch_sharding)
    y = jax.device_put(data.y_train[idx], batch_sharding)
    params, opt_state, loss = train_step(params, opt_state, x, y)
    if step % log_every == 0 or step == a.steps - 1:
      print(f"step {step:4d}  loss {float(loss):.4f}")

  # The params kept their placement through training.
  for (path, x), want in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                             jax.tree.leaves(shardings)):
    assert x.sharding.is_equivalent_to(want, x.ndim), (jax.tree_util.keystr(path), x.sharding)
  kernel = params["Dense_0"]["kernel"]
  print(f"Dense_0/kernel {kernel.shape}: {kernel.sharding.spec}, "
        f"per-device shard {kernel.addressable_shards[0].data.shape}")
  m = len(data.x_test) - len(data.x_test) % n_data  # a multiple of the 'data' axis
  x_test = jax.device_put(data.x_test[:m], batch_sharding)
  y_test = jax.device_put(data.y_test[:m], batch_sharding)
  print(f"final loss {float(loss):.4f}  test accuracy {float(accuracy(params, x_test, y_test)):.3f}")


if __name__ == "__main__":
  main()
