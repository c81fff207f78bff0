"""What the compiled train step contains: op counts of XLA's optimized HLO, per optimizer.

Compiles ``bench.make_step`` (forward, backward, update, apply; params and state donated) for one
benchmark model with ``optax.sgd``, ``gsgd`` and ``gsgd(momentum=0.9)`` and prints a Markdown
table: top-level ops, fusions, reductions, gathers, scatters, copies (and how many are
kernel-sized), dots, host round trips, FLOPs and bytes accessed (``cost_analysis``), XLA's
temporary buffer size; with ``--fusions``, every top-level fusion of the gsgd step by size.

Usage::

  python bench/hlo_report.py                     # mlp1024, full size
  python bench/hlo_report.py --model plainnet34 --quick
  python bench/hlo_report.py --model plainnet34bn --quick   # bn_scaling None / weight / noweight
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import sys
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import optax  # noqa: E402

import bench  # noqa: E402
import gsgd_jax  # noqa: E402

_OP = re.compile(r"^\s*(?:ROOT )?%\S+ = (\S+?)(?:\{[^}]*\})? (\w[\w-]*)\(", re.M)
_HOST = ("send", "recv", "infeed", "outfeed")


def _computations(text: str) -> dict[str, str]:
  """Name -> body of every computation in an HLO module's text."""
  out, name, lines = {}, None, []
  for line in text.splitlines():
    m = re.match(r"^(?:ENTRY )?%(\S+) ", line)
    if m and line.rstrip().endswith("{"):
      name, lines = m.group(1), []
    elif line.startswith("}") and name is not None:
      out[name] = "\n".join(lines)
      name = None
    elif name is not None:
      lines.append(line)
  return out


def _numel(shape: str) -> int:
  m = re.search(r"\[([\d,]*)\]", shape)
  if not m:
    return 0
  return math.prod(int(d) for d in m.group(1).split(",") if d) if m.group(1) else 1


def analyse(compiled, kernel_numel: int) -> dict:
  text = compiled.as_text()
  comps = _computations(text)
  entry = comps[[n for n in comps if text.find(f"ENTRY %{n} ") >= 0][0]]
  top = [(shape, op) for shape, op in _OP.findall(entry)
         if op not in ("parameter", "bitcast", "tuple", "get-tuple-element", "constant")]
  every = Counter(op for body in comps.values() for _, op in _OP.findall(body))
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  mem = compiled.memory_analysis()
  return dict(
      top=len(top),
      fusions=sum(op == "fusion" for _, op in top),
      reduce=every["reduce"],
      gather=every["gather"],
      scatter=every["scatter"],
      copies=sum(op == "copy" for _, op in top),
      big_copies=sum(op == "copy" and _numel(s) >= kernel_numel for s, op in top),
      dots=every["dot"],
      host=sum(every[h] for h in _HOST)
      + len(re.findall(r'custom_call_target="[^"]*(host|callback)', text, re.I)),
      flops=cost.get("flops", 0.0),
      bytes=cost.get("bytes accessed", 0.0),
      temp=getattr(mem, "temp_size_in_bytes", 0) if mem is not None else 0,
      fusion_list=[(shape, op) for shape, op in top if op == "fusion"],
  )


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default="mlp1024",
                 choices=list(bench.DEFAULT_MODELS) + list(bench.BN_MODELS))
  p.add_argument("--quick", action="store_true")
  p.add_argument("--fusions", action="store_true", help="list the gsgd step's fusions")
  args = p.parse_args(argv)

  model, variables, x, y, structure = bench.build(args.model, args.quick)
  params = variables["params"]  # bench.build applies the reference initialization
  bs = variables.get("batch_stats", {})
  kernel_numel = min(math.prod(l.kernel_shape) for c in structure.chains for l in c.layers)
  if args.model in bench.BN_MODELS:  # the BatchNorm scaling modes (issue 11)
    txs = {"optax.sgd, momentum 0.9": optax.sgd(0.01, momentum=0.9)}
    txs.update({f"gsgd, momentum 0.9, bn={mode}": gsgd_jax.gsgd(
                    0.01, momentum=0.9, structure=dataclasses.replace(structure, bn_scaling=mode))
                for mode in bench.BN_SCALINGS})
  else:
    txs = {"optax.sgd": optax.sgd(0.01), "gsgd": gsgd_jax.gsgd(0.01, structure=structure),
           "gsgd, momentum 0.9": gsgd_jax.gsgd(0.01, momentum=0.9, structure=structure)}
  rows = {}
  for name, tx in txs.items():
    step = bench.make_step(model, tx, "batch_stats" in variables)
    compiled = step.lower(params, bs, tx.init(params), x, y).compile()
    rows[name] = analyse(compiled, kernel_numel)

  dev = jax.devices()[0]
  print(f"{args.model} ({'quick' if args.quick else 'full'} size) on {dev.device_kind}, "
        f"jax {jax.__version__}\n")
  print("| in the compiled step | " + " | ".join(rows) + " |")
  print("|---" * (len(rows) + 1) + "|")
  spec = [("top-level ops (no parameters, constants, bitcasts, tuples)", "top", "{}"),
          ("fusions", "fusions", "{}"), ("reductions (incl. inside fusions)", "reduce", "{}"),
          ("gathers", "gather", "{}"), ("scatters", "scatter", "{}"),
          ("copies (of them, kernel-sized)", None, None), ("dots", "dots", "{}"),
          ("host round trips", "host", "{}"), ("GFLOPs (cost analysis)", "flops", None),
          ("bytes accessed, MB (cost analysis)", "bytes", None),
          ("XLA temp buffers, MiB", "temp", None)]
  for label, key, fmt in spec:
    cells = []
    for r in rows.values():
      if key is None:
        cells.append(f"{r['copies']} ({r['big_copies']})")
      elif key == "flops":
        cells.append(f"{r['flops'] / 1e9:.2f}")
      elif key == "bytes":
        cells.append(f"{r['bytes'] / 1e6:.0f}")
      elif key == "temp":
        cells.append(f"{r['temp'] / 2**20:.1f}")
      else:
        cells.append(fmt.format(r[key]))
    print(f"| {label} | " + " | ".join(cells) + " |")
  if args.fusions:
    print("\nfusions of the gsgd step, by output size:")
    fused = rows["gsgd"] if "gsgd" in rows else rows["gsgd, momentum 0.9, bn=weight"]
    for shape, count in Counter(s for s, _ in fused["fusion_list"]).most_common():
      print(f"  {count:3d} x {shape}")


if __name__ == "__main__":
  main()
