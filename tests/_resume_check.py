"""Checkpoint and resume, following the README's recipe; used by tests/test_checkpoints.py.

``save(directory)`` (the first process) trains every case for ``STEPS`` steps, saves params,
optimizer state and structure (flax serialization or Orbax), then trains ``MORE`` steps and saves
the uninterrupted run's final params. ``python tests/_resume_check.py DIRECTORY`` (a new process)
restores every case from its checkpoint alone, trains ``MORE`` steps and saves the resumed
params; the test compares the two bit for bit.

Cases: {flax msgpack, Orbax} x {gsgd with momentum, gsgd_adam} x {Dense MLP, conv net}, each with
``trace_structure``'s aligned skeleton.
"""

from __future__ import annotations

import itertools
import json
import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import gsgd_jax

STEPS, MORE = 6, 3
CASES = [f"{fmt}-{opt}-{net}" for fmt, opt, net in itertools.product(
    ("flax", "orbax"), ("gsgd_momentum", "gsgd_adam"), ("dense", "conv"))]


class Dense(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(16)(x))
    x = nn.relu(nn.Dense(16)(x))
    return nn.Dense(3)(x)


class Conv(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(6, (3,))(x))
    x = nn.relu(nn.Conv(6, (3,))(x))
    return nn.Dense(3)(x.mean(axis=1))


def problem(net: str):
  """``(model, x, y)``: a model and a fixed regression batch."""
  rng = np.random.default_rng(0)
  if net == "dense":
    x = rng.normal(size=(32, 5)).astype(np.float32)
    model = Dense()
  else:
    x = rng.normal(size=(16, 10, 2)).astype(np.float32)
    model = Conv()
  y = rng.normal(size=(x.shape[0], 3)).astype(np.float32)
  return model, jnp.asarray(x), jnp.asarray(y)


def optimizer(opt: str, structure):
  if opt == "gsgd_momentum":
    return gsgd_jax.gsgd(0.05, momentum=0.9, structure=structure)
  return gsgd_jax.gsgd_adam(3e-3, structure=structure)


def train_step(model, tx, x, y):
  def loss(p):
    return jnp.mean((model.apply({"params": p}, x) - y) ** 2)

  @jax.jit
  def step(params, opt_state):
    updates, opt_state = tx.update(jax.grad(loss)(params), opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return step


def _paths(directory, case):
  d = pathlib.Path(directory) / case
  return d, d / "structure.json", d / "state.msgpack", d / "orbax", d / "resumed.npz"


def _flat(params) -> dict:
  return {"/".join(str(k.key) for k in kp): np.asarray(v)
          for kp, v in jax.tree_util.tree_flatten_with_path(params)[0]}


def save(directory) -> dict:
  """Trains and checkpoints every case; returns the uninterrupted runs' final params."""
  from flax import serialization
  import orbax.checkpoint as ocp

  finals = {}
  for case in CASES:
    fmt, opt, net = case.split("-")
    model, x, y = problem(net)
    params = model.init(jax.random.PRNGKey(1), x[:1])["params"]
    # The README's recipe: a traced structure, its skeleton aligned to these weights.
    structure = gsgd_jax.trace_structure(lambda p, x: model.apply({"params": p}, x), params, x[:1])
    tx = optimizer(opt, structure)
    opt_state = tx.init(params)
    step = train_step(model, tx, x, y)
    for _ in range(STEPS):
      params, opt_state = step(params, opt_state)
    d, s_path, msgpack_path, orbax_path, _ = _paths(directory, case)
    d.mkdir(parents=True, exist_ok=True)
    if fmt == "flax":
      s_path.write_text(structure.to_json())
      msgpack_path.write_bytes(serialization.to_bytes({"params": params, "opt_state": opt_state}))
    else:
      with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        ckptr.save(orbax_path.absolute(), args=ocp.args.Composite(
            state=ocp.args.StandardSave({"params": params, "opt_state": opt_state}),
            structure=ocp.args.JsonSave(structure.to_dict())))
    for _ in range(MORE):
      params, opt_state = step(params, opt_state)
    finals[case] = _flat(params)
  return finals


def resume(directory) -> None:
  """Restores every case from its checkpoint and trains ``MORE`` steps."""
  from flax import serialization
  import orbax.checkpoint as ocp

  for case in CASES:
    fmt, opt, net = case.split("-")
    model, x, y = problem(net)
    # Params of the right layout (any values): the template restored into.
    template_params = model.init(jax.random.PRNGKey(7), x[:1])["params"]
    d, s_path, msgpack_path, orbax_path, out = _paths(directory, case)
    if fmt == "flax":
      structure = gsgd_jax.BasisPathStructure.from_json(s_path.read_text())
      tx = optimizer(opt, structure)
      template = {"params": template_params, "opt_state": tx.init(template_params)}
      restored = serialization.from_bytes(template, msgpack_path.read_bytes())
    else:
      with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        saved = ckptr.restore(orbax_path.absolute(), args=ocp.args.Composite(
            structure=ocp.args.JsonRestore()))
        structure = gsgd_jax.BasisPathStructure.from_dict(saved.structure)
        tx = optimizer(opt, structure)
        abstract = jax.eval_shape(lambda p: {"params": p, "opt_state": tx.init(p)},
                                  template_params)
        restored = ckptr.restore(orbax_path.absolute(), args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract))).state
    params, opt_state = restored["params"], restored["opt_state"]
    step = train_step(model, tx, x, y)
    for _ in range(MORE):
      params, opt_state = step(params, opt_state)
    np.savez(out, **_flat(params))
  print(json.dumps({"resumed": len(CASES)}))


if __name__ == "__main__":
  resume(sys.argv[1])
