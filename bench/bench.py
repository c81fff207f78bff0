"""Train-step benchmark: G-SGD variants against their optax baselines, in one process.

Each jitted train step is forward + backward + optimizer update + apply. Optimizers are timed
interleaved (round robin, several rounds), and we report per-step medians, the ratio to the
baseline, compile time, optimizer-state size and XLA's memory analysis of the compiled step
(temporary buffers), for:

* ``mlp1024``: MLP 784-1024x4-10, batch 128 (launch-bound);
* ``mlp4096``: MLP 784-4096x4-10, batch 256;
* ``plainnet34``: PlainNet-34 (widths 64-128-256-512, no BN), 32x32x3, batch 128 (one chain);
* ``resnet18``: ResNet-18 for CIFAR with BatchNorm, batch 128 (one chain per residual branch,
  BN parameters, stem, shortcuts and head trained by the fallback);
* ``plainnet34bn``: PlainNet-34 with BatchNorm after every conv, structure from
  ``trace_structure(..., normalization="reference")`` (one 34-layer chain through the BN layers,
  33 convs flagged ``normalized``). Times ``optax.sgd(momentum=0.9)`` against
  ``gsgd(momentum=0.9, bn_scaling=...)`` for ``None``, ``"weight"`` and ``"noweight"`` (the
  momentum pair only, whatever ``--pairs`` says) and reports the cost of the reference code's
  BatchNorm scaling (each ``bn_scaling`` over ``bn_scaling=None``).

``--quick`` shrinks everything for a CPU (widths / 8, batch 32, 8x8 images).

Usage::

  python bench/bench.py --quick                  # CPU smoke run (~1-2 min on 2 cores)
  python bench/bench.py --models mlp1024 --out bench/results_cpu.md
  python bench/bench.py --quick --models plainnet34bn   # BatchNorm scaling cost (not a default)
"""

from __future__ import annotations

import argparse
import datetime
import dataclasses
import functools
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import gsgd_jax
from gsgd_jax.lab import models, training

PAIRS = {
    "sgd": (lambda: optax.sgd(0.01), lambda s: gsgd_jax.gsgd(0.01, structure=s)),
    "momentum": (lambda: optax.sgd(0.01, momentum=0.9),
                 lambda s: gsgd_jax.gsgd(0.01, momentum=0.9, structure=s)),
    "adam": (lambda: optax.adam(1e-3), lambda s: gsgd_jax.gsgd_adam(1e-3, structure=s)),
}

# Models whose structure has normalized layers: timed for each ``bn_scaling`` of G-SGD with
# momentum, against optax.sgd(momentum=0.9) (issue 11).
BN_MODELS = ("plainnet34bn",)
DEFAULT_MODELS = ("mlp1024", "mlp4096", "plainnet34", "resnet18")
BN_SCALINGS = (None, "weight", "noweight")


def _bn_label(mode) -> str:
  return f"momentum bn={mode}"


def _variants(name: str, pairs):
  """``(row label, baseline pair, G-space optimizer factory)`` for each row of one model."""
  if name in BN_MODELS:
    return [(_bn_label(mode), "momentum",
             functools.partial(lambda mode, s: gsgd_jax.gsgd(
                 0.01, momentum=0.9, structure=dataclasses.replace(s, bn_scaling=mode)), mode))
            for mode in BN_SCALINGS]
  return [(pair, pair, PAIRS[pair][1]) for pair in pairs]


def _bn_structure(model, variables, x):
  """The reference code's BatchNorm heuristic: chains through BN, traced in train mode."""
  def apply_fn(p, inputs):
    return model.apply({**variables, "params": p}, inputs, train=True, mutable=["batch_stats"])

  return gsgd_jax.trace_structure(apply_fn, variables["params"], x, normalization="reference")


def _resnet_chains(params):
  chains = []
  for name in sorted((k for k in params if k.startswith("stage")), key=gsgd_jax._tree.natural_key):
    chains.append([(name, "conv1", "kernel"), (name, "conv2", "kernel")])
  return chains


def build(name: str, quick: bool, div: int | None = None):
  """Returns ``(model, variables, x, y, structure)`` for one benchmark model (``div``: divide
  the widths by this instead of 8 (quick) or 1, for tests)."""
  div = div or (8 if quick else 1)
  key = jax.random.PRNGKey(0)
  if name.startswith("mlp"):
    width = (1024 if name == "mlp1024" else 4096) // div
    batch = (128 if name == "mlp1024" else 256) // (4 if quick else 1)
    model = models.MLP(features=(width,) * 4, num_classes=10)
    x = jax.random.normal(key, (batch, 784))
    variables = model.init(key, x[:1])
    structure = gsgd_jax.infer_structure(variables["params"])
  else:
    batch, hw = (32, 8) if quick else (128, 32)
    x = jax.random.normal(key, (batch, hw, hw, 3))
    widths = tuple(w // div for w in (64, 128, 256, 512))
    if name == "plainnet34":
      model = models.PlainNet(stage_sizes=(6, 8, 12, 6), widths=widths, num_classes=10, norm=False)
      variables = model.init(key, x[:1])
      p = variables["params"]
      order = ["stem"] + sorted((k for k in p if k.startswith("stage")),
                                key=gsgd_jax._tree.natural_key) + ["head"]
      structure = gsgd_jax.chain_structure(p, [[(k, "kernel") for k in order]])
    elif name == "plainnet34bn":
      model = models.PlainNet(stage_sizes=(6, 8, 12, 6), widths=widths, num_classes=10, norm=True)
      variables = model.init(key, x[:1])
      structure = _bn_structure(model, variables, x)
    elif name == "resnet18":
      model = models.ResNet(stage_sizes=(2, 2, 2, 2), widths=widths, num_classes=10, norm=True)
      variables = model.init(key, x[:1])
      structure = gsgd_jax.chain_structure(variables["params"], _resnet_chains(variables["params"]))
    else:
      raise ValueError(f"unknown model {name!r}")
  y = jnp.arange(x.shape[0]) % 10
  # The reference initialization (skeleton weights 1) for every optimizer: G-SGD's steps stay
  # finite (from the default init they overflow to inf/NaN, which says nothing about speed).
  variables = dict(variables)
  variables["params"] = gsgd_jax.reset_skeleton(structure, variables["params"])
  return model, variables, x, y, structure


def make_step(model, tx, has_bn: bool):
  """Jitted train step (params, batch_stats and optimizer state donated), with the loss of
  :mod:`gsgd_jax.lab.training`."""
  loss_fn = functools.partial(training._loss_fn, model)

  def step(params, batch_stats, opt_state, x, y):
    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, batch_stats if has_bn else None, x, y, True)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), new_stats if has_bn else batch_stats,
            opt_state, loss)

  return jax.jit(step, donate_argnums=(0, 1, 2))


def _nbytes(tree) -> int:
  return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree)
             if hasattr(x, "dtype"))


def bench_model(name: str, quick: bool, pairs, rounds: int, iters: int,
                compare_modulo: bool = False, div: int | None = None):
  """Times each pair; with ``compare_modulo`` also the G-space optimizer on the modulo skeleton
  (same params, same reference initialization; the default structure's skeleton is aligned).
  A model of ``BN_MODELS`` times its ``bn_scaling`` variants instead (see :func:`_variants`; no
  modulo comparison). ``div``: as in :func:`build`."""
  model, variables, x, y, structure = build(name, quick, div)
  variants = _variants(name, pairs)
  bn = name in BN_MODELS
  compare_modulo = compare_modulo and not bn  # the BN case compares bn_scaling modes instead
  modulo = None
  if compare_modulo:  # skeleton weights 1 on both skeletons, so both steps stay finite
    modulo = gsgd_jax.skeleton.with_skeleton(structure, variables["params"], "modulo")
    variables = dict(variables)
    variables["params"] = gsgd_jax.reset_skeleton(modulo, variables["params"])
  has_bn = "batch_stats" in variables
  params = variables["params"]
  bs = variables.get("batch_stats", {})
  rows = []
  entries = {}
  txs = []
  for row, pair, ours in variants:
    if f"optax.{pair}" not in dict(txs):
      txs.append((f"optax.{pair}", PAIRS[pair][0]()))
    txs.append((f"gsgd.{row}", ours(structure)))
    if compare_modulo:
      txs.append((f"modulo.{row}", ours(modulo)))
  for label, tx in txs:
    step = make_step(model, tx, has_bn)
    state = tx.init(params)
    t0 = time.perf_counter()
    compiled = step.lower(params, bs, state, x, y).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    temp = getattr(mem, "temp_size_in_bytes", None) if mem is not None else None
    carry = jax.tree.map(jnp.copy, (params, bs, state))
    out = compiled(*carry, x, y)  # warm-up
    carry = out[:3]
    jax.block_until_ready(carry)
    entries[label] = dict(compiled=compiled, carry=carry, times=[], compile=compile_s,
                          temp=temp, state=_nbytes(state), losses=[float(out[3])])
  for _ in range(rounds):  # interleaved
    for label, e in entries.items():
      carry = e["carry"]
      t0 = time.perf_counter()
      for _ in range(iters):
        out = e["compiled"](*carry, x, y)
        carry = out[:3]
      jax.block_until_ready(carry)
      e["times"].append((time.perf_counter() - t0) / iters)
      e["carry"] = carry
      e["losses"].append(float(out[3]))
  med = {label: statistics.median(e["times"]) for label, e in entries.items()}
  for row, pair, _ in variants:
    base = entries[f"optax.{pair}"]
    ours = entries[f"gsgd.{row}"]
    mb, mo = med[f"optax.{pair}"], med[f"gsgd.{row}"]
    mm = med[f"modulo.{row}"] if compare_modulo else None
    rows.append(dict(model=name, pair=row, base_ms=mb * 1e3, gsgd_ms=mo * 1e3, ratio=mo / mb,
                     aligned_over_modulo=None if mm is None else mo / mm,
                     over_bn_none=mo / med[f"gsgd.{_bn_label(None)}"] if bn else None,
                     finite=all(np.isfinite(ours["losses"] + base["losses"])),
                     compile_base=base["compile"], compile_gsgd=ours["compile"],
                     temp_base=base["temp"], temp_gsgd=ours["temp"],
                     state_base=base["state"], state_gsgd=ours["state"],
                     param_bytes=_nbytes(params)))
  return rows


def _mib(x):
  return "n/a" if x is None else f"{x / 2**20:.1f}"


def format_table(rows, quick: bool) -> str:
  dev = jax.devices()[0]
  head = (f"Device: {dev.device_kind} ({dev.platform}), {jax.device_count()} device(s); "
          f"jax {jax.__version__}; {platform.processor() or platform.machine()}; "
          f"{datetime.date.today().isoformat()}; {'quick sizes' if quick else 'full sizes'}\n\n")
  modulo = any(r.get("aligned_over_modulo") is not None for r in rows)
  bn = any(r.get("over_bn_none") is not None for r in rows)
  lines = ["| model | optimizer | optax ms/step | gsgd ms/step | ratio | compile s (optax/gsgd) "
           "| temp MiB (optax/gsgd) | state MiB (optax/gsgd) | params MiB |"
           + (" aligned / modulo |" if modulo else "") + (" over bn=None |" if bn else ""),
           "|---|---|---|---|---|---|---|---|---|" + ("---|" if modulo else "")
           + ("---|" if bn else "")]

  def ratio(x):
    return "-" if x is None else f"{x:.3f}x"

  for r in rows:
    lines.append(f"| {r['model']} | {r['pair']} | {r['base_ms']:.3f} | {r['gsgd_ms']:.3f} | "
                 f"**{r['ratio']:.3f}x** | {r['compile_base']:.1f} / {r['compile_gsgd']:.1f} | "
                 f"{_mib(r['temp_base'])} / {_mib(r['temp_gsgd'])} | "
                 f"{_mib(r['state_base'])} / {_mib(r['state_gsgd'])} | {_mib(r['param_bytes'])} |"
                 + (f" {ratio(r['aligned_over_modulo'])} |" if modulo else "")
                 + (f" {ratio(r.get('over_bn_none'))} |" if bn else ""))
  notes = [f"{r['model']} {r['pair']}: non-finite loss during the run (timings of NaN steps)"
           for r in rows if not r.get("finite", True)]
  return head + "\n".join(lines) + "\n" + "".join(f"\n{n}\n" for n in notes)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--quick", action="store_true", help="small sizes for a CPU")
  p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS),
                 choices=list(DEFAULT_MODELS) + list(BN_MODELS))
  p.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
  p.add_argument("--rounds", type=int, default=7)
  p.add_argument("--iters", type=int, default=10)
  p.add_argument("--out", default=None, help="also write the markdown table to this file")
  p.add_argument("--compare-modulo", action="store_true",
                 help="also time the G-space optimizers on the modulo skeleton (aligned / modulo)")
  a = p.parse_args(argv)
  rows = []
  for name in a.models:
    t0 = time.perf_counter()
    rows += bench_model(name, a.quick, a.pairs, a.rounds, a.iters, a.compare_modulo)
    print(f"[{name}: {time.perf_counter() - t0:.0f}s]", flush=True)
    if a.out:  # after every model, so a run cut short by a time limit keeps what it measured
      with open(a.out, "w") as f:
        f.write(format_table(rows, a.quick))
  print(format_table(rows, a.quick))


if __name__ == "__main__":
  main()
