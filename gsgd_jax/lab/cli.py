"""Experiment runner: optimizers x learning rates x seeds, like for like, with tables and plots.

Every optimizer gets the same budget: the same model, the same initial parameters per seed (one
init per seed, shared by all optimizers; ``--init reference`` resets the skeleton weights to 1 for
everyone, ``--rescale-init F`` rescales the hidden units of that shared init at random), the same
minibatches in the same order per seed, the same epochs and the same learning-rate schedule shape
(constant or cosine decay to 0, scaled by the peak learning rate being tried). The learning rate of
each optimizer is picked on the validation split (mean over seeds of the final validation
accuracy), and the test accuracy is reported at that learning rate, as mean and std over seeds.

Examples::

    python -m gsgd_jax.lab.cli --list-presets
    python -m gsgd_jax.lab.cli --preset results-mnist1d-mlp --out results/mnist1d-mlp
    python -m gsgd_jax.lab.cli --preset results-all --out results --figures docs/figures
    python -m gsgd_jax.lab.cli --preset bn-all --out results/bn --figures docs/figures
    python -m gsgd_jax.lab.cli --preset fmnist-mlp --out results/fmnist-mlp --figures docs/figures
    python -m gsgd_jax.lab.cli --preset depth-fmnist-mlp --out results/depth-all
    python -m gsgd_jax.lab.cli --preset depth-digits-cnn --out results/depth-all
    python -m gsgd_jax.lab.cli --preset depth-all --out results/depth-all --reuse  # the figure
    python -m gsgd_jax.lab.cli --dataset digits --model mlp --width 64 --depth 3 \\
        --optimizers sgd gsgd adam --seeds 3 --lrs 0.03 0.1 0.3 --lr adam=1e-3,3e-3 --epochs 20

Outputs in ``--out`` (for a preset with several parts, one sub-directory per part plus a
``comparison.md``/``comparison.csv``/``invariance.png`` when the parts differ only in
``rescale_init``):

* ``config.json``: the experiment's configuration; ``structure.txt``: the G-space structure;
* ``runs/<optimizer>_lr<lr>_seed<seed>.json``: curves (train loss, val and test accuracy per
  epoch), wall time, final numbers and config of every run; ``runs.csv``: one row per run;
* ``summary.csv``: one row per (optimizer, lr), mean and std over seeds, ``selected`` marking the
  learning rate chosen on validation; ``results.json`` and ``table.md``: the best-lr table;
* for the BatchNorm presets (``bn-*``): one part per G-space setting (``<net>-fallback``,
  ``<net>-reference``, ``<net>-reference-weight``; the SGD+momentum and Adam baselines run once, in
  the first part) and ``<net>/``, the merged table (``table.md``, ``summary.csv``,
  ``results.json``) and plots of the three settings and the baselines;
* for the depth studies (``depth-*``): ``<study>/`` with ``table.md`` (test accuracy, final
  training loss and G-space minus weight-space margins per depth), ``depth.csv`` and
  ``depth.png``, and ``depth.png`` of all the preset's studies in ``--out``;
* ``loss_curves.png`` (training loss and test accuracy per epoch at each optimizer's selected
  learning rate, band = min/max over seeds) and ``accuracy_vs_lr.png`` (final test accuracy vs
  learning rate, mean +- std over seeds).

The compiled training epoch is reused across the learning-rate grid and the seeds: each optimizer
is built once with ``optax.inject_hyperparams`` (the learning rate is an array in the optimizer
state), so the runner compiles once per (model, optimizer).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any, Sequence

from gsgd_jax.lab import datasets, models
from gsgd_jax.lab.config import (ALL_OPTIMIZERS, DTYPES, INITS, NORMALIZATIONS, OPTIMIZERS,
                                 PRESETS, SCHEDULES,
                                 ExperimentConfig, tiny)
from gsgd_jax.lab.runner import run_experiment, run_preset
from gsgd_jax.structure import SKELETONS

__all__ = ["main"]


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------

def _parse_lr_override(text: str) -> tuple[str, tuple[float, ...]]:
  if "=" not in text:
    raise argparse.ArgumentTypeError(f"--lr expects OPTIMIZER=LR[,LR...], got {text!r}.")
  name, values = text.split("=", 1)
  name = name.strip()
  if name not in ALL_OPTIMIZERS:
    raise argparse.ArgumentTypeError(f"Unknown optimizer {name!r} in --lr; choose from "
                                     f"{ALL_OPTIMIZERS}.")
  try:
    return name, tuple(float(v) for v in values.split(",") if v.strip())
  except ValueError as e:
    raise argparse.ArgumentTypeError(f"Bad learning rates in {text!r}: {e}") from None


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="gsgd-experiment", description=__doc__.splitlines()[0],
      epilog="Config flags left out take the preset's value (or the default). Presets: "
             + ", ".join(sorted(PRESETS)))
  p.add_argument("--preset", choices=sorted(PRESETS),
                 help="a named configuration (docs/results.md)")
  p.add_argument("--list-presets", action="store_true", help="print the presets and exit")
  p.add_argument("--tiny", action="store_true",
                 help="CI size: 1 seed, 2 lrs per optimizer, 1 epoch, 256-example subset")
  p.add_argument("--out", default=None, help="output directory (default: results/<preset or run>)")
  p.add_argument("--figures", default=None, help="also copy the plots into this directory")
  p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
  p.add_argument("--reuse", action="store_true",
                 help="with --preset: read the parts already in --out with the same "
                      "configuration instead of rerunning them (tables and figures are redrawn)")
  g = p.add_argument_group("configuration")
  g.add_argument("--dataset", choices=datasets.DATASETS)
  g.add_argument("--data-dir", help="root of cifar-10-batches-py / cifar-100-python / idx files "
                                    "(MNIST: optional, in mnist/)")
  g.add_argument("--subset", type=int, help="use this many train (and at most this many val/test) "
                                            "examples")
  g.add_argument("--model", choices=models.MODELS)
  g.add_argument("--width", type=int, help="hidden width / channels / first-stage width")
  g.add_argument("--depth", type=int, help="hidden layers (mlp) / convs (cnn1d) / convs per stage "
                                           "(plainnet)")
  g.add_argument("--model-kwargs", type=json.loads, help="JSON dict of model keyword arguments")
  g.add_argument("--optimizers", nargs="+", choices=ALL_OPTIMIZERS)
  g.add_argument("--lrs", type=float, nargs="+", help="learning-rate grid for every optimizer")
  g.add_argument("--lr", type=_parse_lr_override, action="append", metavar="OPT=LR,LR",
                 help="learning-rate grid of one optimizer (repeatable; overrides --lrs)")
  g.add_argument("--seeds", type=int, help="number of seeds (0..N-1)")
  g.add_argument("--epochs", type=int)
  g.add_argument("--batch-size", type=int)
  g.add_argument("--schedule", choices=SCHEDULES)
  g.add_argument("--momentum", type=float, help="for sgd_momentum and gsgd_momentum")
  g.add_argument("--init", choices=INITS, help="reference: skeleton weights set to 1 (for all)")
  g.add_argument("--rescale-init", type=float, metavar="FACTOR",
                 help="random hidden-unit rescaling of the initial network, factors in "
                      "[1/FACTOR, FACTOR] (1: none)")
  g.add_argument("--dtype", choices=DTYPES, help="float64 runs with jax x64 enabled")
  g.add_argument("--normalization", choices=NORMALIZATIONS,
                 help="BatchNorm nets: chains through BN (reference) or BN layers outside G-space")
  g.add_argument("--bn-scaling", choices=("weight", "noweight", "none"),
                 help="BatchNorm nets, normalization=reference: the reference code's scaling of "
                      "the G-space optimizers on normalized layers (default weight; none: off)")
  g.add_argument("--skeleton", choices=SKELETONS,
                 help="G-space skeleton: aligned to each seed's initial weights, or j mod h")
  g.add_argument("--normalize", type=lambda t: t.lower() in ("1", "true", "yes"),
                 metavar="BOOL", help="G-space in normalized path coordinates (default true)")
  g.add_argument("--balance", type=float, help="per-path scales in [0, 1] (default 1)")
  return p


_FIELDS = ("dataset", "data_dir", "subset", "model", "width", "depth", "model_kwargs",
           "optimizers", "seeds", "epochs", "batch_size", "schedule", "momentum", "init",
           "rescale_init", "normalization", "dtype", "skeleton", "normalize", "balance")


def _overrides(a: argparse.Namespace) -> dict[str, Any]:
  out = {f: getattr(a, f) for f in _FIELDS if getattr(a, f) is not None}
  if "optimizers" in out:
    out["optimizers"] = tuple(out["optimizers"])
  if a.bn_scaling is not None:
    out["bn_scaling"] = None if a.bn_scaling == "none" else a.bn_scaling
  lrs = {}
  if a.lrs is not None:
    names = out.get("optimizers") or (
        PRESETS[a.preset][0][1].optimizers if a.preset else OPTIMIZERS)
    lrs = {n: tuple(a.lrs) for n in names}
  for name, values in a.lr or ():
    lrs[name] = values
  if lrs:
    out["lrs"] = lrs
  return out


def main(argv: Sequence[str] | None = None) -> dict:
  """Command-line entry point (``gsgd-experiment`` / ``python -m gsgd_jax.lab.cli``).

  Args:
    argv: the command-line arguments (without the program name); ``sys.argv[1:]`` if None.

  Returns:
    ``{}`` with ``--list-presets`` (the presets are printed); with ``--preset``, ``{part:
    results}`` from :func:`gsgd_jax.lab.runner.run_preset`; otherwise ``{out_dir_name:
    results}`` with the results of :func:`gsgd_jax.lab.runner.run_experiment`.
  """
  a = _parser().parse_args(argv)
  if a.list_presets:
    for name, parts in PRESETS.items():
      print(f"{name}:")
      for part, c in parts:
        print(f"  {part}: {json.dumps(c.to_json())}")
    return {}
  overrides = _overrides(a)
  if "lrs" in overrides and a.preset:
    # Merge with the preset's grids so optimizers not named keep theirs.
    base = PRESETS[a.preset][0][1]
    overrides["lrs"] = {**{n: base.grid(n) for n in ALL_OPTIMIZERS}, **overrides["lrs"]}
  progress = not a.no_progress
  if a.preset:
    out = a.out or str(Path("results") / a.preset)
    return run_preset(a.preset, out, overrides=overrides, tiny_run=a.tiny, progress=progress,
                      figures=a.figures, reuse=a.reuse)
  config = ExperimentConfig(**overrides)
  if a.tiny:
    config = tiny(config)
  out = Path(a.out or "results/run")
  results = run_experiment(config, out, progress=progress)
  if a.figures:
    fig_dir = Path(a.figures)
    fig_dir.mkdir(parents=True, exist_ok=True)
    for png in ("loss_curves.png", "accuracy_vs_lr.png"):
      shutil.copyfile(out / png, fig_dir / f"{out.name}-{png}")
  return {out.name: results}


if __name__ == "__main__":
  main()
