"""Stacked layers against their unrolled twin: train-step time of a ReLU MLP whose hidden layers
are one ``nn.scan`` stack, and of the same MLP with one ``Dense`` per layer.

Each model is timed with ``optax.sgd`` and ``gsgd_jax.gsgd``, without and with momentum 0.9 (jitted
step: forward, backward, update, apply; params and state donated), interleaved round robin in one
process. The table gives per-step medians (and minima), each G-space step over its weight-space
twin, and the G-space cost per layer, ``(gsgd - sgd) / layers``, of the stack and of the
unrolled layers (the same layers either way).

    python bench/bench_stacks.py --quick      # width 128, depth 8 (CPU, about a minute)
    python bench/bench_stacks.py              # width 1024, depth 8
"""

from __future__ import annotations

import argparse
import statistics
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


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--width", type=int, default=None)
  ap.add_argument("--depth", type=int, default=8)
  ap.add_argument("--batch", type=int, default=128)
  ap.add_argument("--rounds", type=int, default=7)
  ap.add_argument("--iters", type=int, default=10)
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


if __name__ == "__main__":
  main()
