"""Stacked layers against their unrolled twin: train-step time of a ReLU MLP whose hidden layers
are one ``nn.scan`` stack, and of the same MLP with one ``Dense`` per layer.

Each model is timed with ``optax.sgd`` and ``gsgd_jax.gsgd``, without and with momentum 0.9 (jitted
step: forward, backward, update, apply; params and state donated), interleaved round robin in one
process. The table gives per-step medians (and minima), each G-space step over its weight-space
twin, and the G-space cost per layer, ``(gsgd - sgd) / layers``, of the stack and of the
unrolled layers (the same layers either way).

That wall-clock difference also carries whatever XLA does differently to the forward and backward
pass of the two steps (on XLA:CPU the unrolled weight-space momentum step copies every kernel).
``--profile`` therefore adds a second table from a ``jax.profiler`` trace of each step: the
summed thread time of the compiled ops that belong to the update (every op whose HLO
``op_name`` is outside the ``jvp``/``transpose`` of the model, i.e. the optimizer and
``apply_updates``), per step and per layer.

    python bench/bench_stacks.py --quick      # width 128, depth 8 (CPU, about a minute)
    python bench/bench_stacks.py              # width 1024, depth 8
    python bench/bench_stacks.py --profile    # and the update's own op time
"""

from __future__ import annotations

import argparse
import collections
import glob
import re
import statistics
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import gsgd_jax


class Block(nn.Module):
  width: int

  @nn.compact
  def __call__(self, x, _):
    return nn.relu(nn.Dense(self.width)(x)), None


class Stacked(nn.Module):
  width: int
  depth: int

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(self.width)(x))
    x, _ = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                   length=self.depth)(self.width, name="stack")(x, None)
    return nn.Dense(10)(x)


class Unrolled(nn.Module):
  width: int
  depth: int

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(self.width)(x))
    for _ in range(self.depth):
      x = nn.relu(nn.Dense(self.width)(x))
    return nn.Dense(10)(x)


def _step(apply_fn, tx):
  def loss(p, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(apply_fn(p, x), y).mean()

  @jax.jit
  def step(p, s, x, y):
    g = jax.grad(loss)(p, x, y)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  return jax.jit(step, donate_argnums=(0, 1))


def _update_op_ms(step, p, s, x, y, iters):
  """Thread time (ms per step) of the update's compiled ops, from a ``jax.profiler`` trace.

  Returns ``(update_ms, p, s)``, or ``(None, p, s)`` where this jaxlib cannot read its traces.
  """
  try:
    from jax._src.lib import _profile_data  # a private reader; present in jaxlib >= 0.4.36
  except ImportError:
    return None, p, s
  model_op = {}
  for line in step.lower(p, s, x, y).compile().as_text().splitlines():
    m = re.match(r"\s*(?:ROOT )?%(\S+) = .*op_name=\"([^\"]*)\"", line)
    if m:
      model_op[m.group(1)] = "jvp(" in m.group(2) or "transpose(" in m.group(2)
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d):
      for _ in range(iters):
        p, s = step(p, s, x, y)
      jax.block_until_ready(p)
    (trace,) = glob.glob(f"{d}/**/*.xplane.pb", recursive=True)
    data = _profile_data.ProfileData.from_file(trace)
  total = collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      for event in line.events:
        if model_op.get(event.name) is False:
          total[event.name] += event.duration_ns
  return sum(total.values()) / 1e6 / iters, p, s


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--width", type=int, default=None)
  ap.add_argument("--depth", type=int, default=8)
  ap.add_argument("--batch", type=int, default=128)
  ap.add_argument("--rounds", type=int, default=7)
  ap.add_argument("--iters", type=int, default=10)
  ap.add_argument("--profile", action="store_true",
                  help="also the update's own op time, from a jax.profiler trace")
  a = ap.parse_args(argv)
  width = a.width or (128 if a.quick else 1024)
  x = jax.random.normal(jax.random.PRNGKey(1), (a.batch, 784))
  y = jax.random.randint(jax.random.PRNGKey(2), (a.batch,), 0, 10)
  runs = {}
  for name, model in (("stacked", Stacked(width, a.depth)), ("unrolled", Unrolled(width, a.depth))):
    params = model.init(jax.random.PRNGKey(0), x)["params"]
    apply_fn = lambda p, x, model=model: model.apply({"params": p}, x)  # noqa: E731
    structure = gsgd_jax.trace_structure(apply_fn, params, x)
    assert len(structure.chains) == 1 and len(structure.chains[0].layers) == a.depth + 2
    for opt, tx in (("sgd", optax.sgd(0.01)),
                    ("gsgd", gsgd_jax.gsgd(0.01, structure=structure)),
                    ("sgd_momentum", optax.sgd(0.01, momentum=0.9)),
                    ("gsgd_momentum", gsgd_jax.gsgd(0.01, momentum=0.9, structure=structure))):
      step = _step(apply_fn, tx)
      p = jax.tree.map(jnp.copy, params)
      s = tx.init(p)
      t0 = time.perf_counter()
      p, s = step(p, s, x, y)
      jax.block_until_ready(p)
      runs[name, opt] = {"step": step, "p": p, "s": s, "compile": time.perf_counter() - t0,
                         "times": []}
  for _ in range(a.rounds):
    for r in runs.values():
      t0 = time.perf_counter()
      for _ in range(a.iters):
        r["p"], r["s"] = r["step"](r["p"], r["s"], x, y)
      jax.block_until_ready(r["p"])
      r["times"].append((time.perf_counter() - t0) / a.iters)
  med = {k: statistics.median(r["times"]) for k, r in runs.items()}
  best = {k: min(r["times"]) for k, r in runs.items()}
  layers = a.depth + 2
  print(f"MLP 784-{width}x{a.depth + 1}-10, batch {a.batch}, {jax.devices()[0].platform}; "
        f"{a.rounds} rounds x {a.iters} steps, median (min) ms per step")
  print("| model | pair | weight space | G-space | G / weight | G-space ms per layer | "
        "compile s (G) |")
  print("|---|---|---|---|---|---|---|")
  for name in ("stacked", "unrolled"):
    for pair, (w, gk) in (("sgd", ("sgd", "gsgd")),
                          ("momentum", ("sgd_momentum", "gsgd_momentum"))):
      sgd, g = med[name, w], med[name, gk]
      bs, bg = best[name, w], best[name, gk]
      print(f"| {name} | {pair} | {sgd * 1e3:.2f} ({bs * 1e3:.2f}) | {g * 1e3:.2f} "
            f"({bg * 1e3:.2f}) | {g / sgd:.3f} ({bg / bs:.3f}) | {(g - sgd) * 1e3 / layers:.3f} "
            f"({(bg - bs) * 1e3 / layers:.3f}) | {runs[name, gk]['compile']:.1f} |")
  if not a.profile:
    return
  if jax.devices()[0].platform != "cpu":
    print("\n--profile reads the op events of XLA:CPU's thunks; skipped on "
          f"{jax.devices()[0].platform}")
    return
  ops = {}
  for key, r in runs.items():
    ops[key], r["p"], r["s"] = _update_op_ms(r["step"], r["p"], r["s"], x, y, a.iters)
  if None in ops.values():
    print("\n--profile: this jaxlib has no trace reader (jax._src.lib._profile_data); skipped")
    return
  print(f"\nThread time of the update's ops (optimizer and apply_updates), ms per step, "
        f"{a.iters} steps")
  print("| model | pair | weight space | G-space | G-space per layer | G - weight per layer |")
  print("|---|---|---|---|---|---|")
  for name in ("stacked", "unrolled"):
    for pair, (w, gk) in (("sgd", ("sgd", "gsgd")),
                          ("momentum", ("sgd_momentum", "gsgd_momentum"))):
      ow, og = ops[name, w], ops[name, gk]
      print(f"| {name} | {pair} | {ow:.2f} | {og:.2f} | {og / layers:.3f} | "
            f"{(og - ow) / layers:.3f} |")


if __name__ == "__main__":
  main()
