"""Experiment configurations: :class:`ExperimentConfig`, the optimizer names and default grids, and
the named presets behind ``docs/results.md`` (``python -m gsgd_jax.lab.cli --list-presets``)."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from gsgd_jax.structure import SKELETONS

__all__ = [
    "ExperimentConfig",
    "OPTIMIZERS",
    "EXTRA_OPTIMIZERS",
    "ALL_OPTIMIZERS",
    "DEFAULT_LRS",
    "PRESETS",
    "COMPARISONS",
    "DEPTH_STUDIES",
    "BN_SCALINGS",
    "setting_label",
    "tiny",
]

OPTIMIZERS = ("sgd", "sgd_momentum", "adam", "gsgd", "gsgd_momentum", "gsgd_adam", "path_sgd")
# Optimizers that presets name explicitly (never part of the default list): ``gsgd_paper`` is the
# paper's plain G-SGD (``j mod h`` skeleton, plain path coordinates, ``gsgd_jax.PAPER``) started
# from the reference code's initialization (the seed's init with its skeleton weights set to 1),
# whatever ``init`` / ``skeleton`` / ``normalize`` the other optimizers of the experiment use.
EXTRA_OPTIMIZERS = ("gsgd_paper",)
ALL_OPTIMIZERS = OPTIMIZERS + EXTRA_OPTIMIZERS

# Learning-rate grids used when neither the command line nor a preset gives one.
DEFAULT_LRS: dict[str, tuple[float, ...]] = {
    "sgd": (0.01, 0.03, 0.1, 0.3),
    "sgd_momentum": (0.001, 0.003, 0.01, 0.03),
    "adam": (1e-4, 3e-4, 1e-3, 3e-3),
    "gsgd": (0.01, 0.03, 0.1, 0.3),
    "gsgd_momentum": (0.001, 0.003, 0.01, 0.03),
    "gsgd_adam": (1e-4, 3e-4, 1e-3, 3e-3),
    "path_sgd": (0.001, 0.003, 0.01, 0.03),
    "gsgd_paper": (0.01, 0.03, 0.1, 0.3),
}

SCHEDULES = ("constant", "cosine", "reference")
INITS = ("reference", "default")
NORMALIZATIONS = ("reference", "fallback")
BN_SCALINGS = ("weight", "noweight", None)
DTYPES = ("float32", "float64")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  """Everything that defines an experiment (JSON-serializable; written to ``config.json``).

  Attributes:
    dataset: one of :data:`gsgd_jax.lab.datasets.DATASETS`.
    data_dir: root of the file-based datasets (CIFAR, Fashion-MNIST, MNIST's optional idx files
      in ``mnist/``); ``$GSGD_DATA_DIR`` or ``./data`` if None.
    subset: if set, train on this many training examples (a fixed random subset, the same for
      every seed) and evaluate on at most this many validation and test examples.
    model: one of ``'mlp'``, ``'reference_mlp'``, ``'cnn1d'``, ``'plainnet'``, ``'plainnet34'``,
      ``'resnet'`` (two stages), ``'resnet18'``, ``'resnet34'``.
    width: hidden width (mlp), channels (cnn1d), first-stage width (plainnet, resnet); the model's
      default if None.
    depth: hidden layers (mlp), conv layers (cnn1d), convs per stage (plainnet), blocks per
      stage (resnet); the model's default if None.
    model_kwargs: extra keyword arguments of the model (override ``width`` / ``depth``).
    optimizers: names from :data:`OPTIMIZERS` (and :data:`EXTRA_OPTIMIZERS`).
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
    bn_scaling: the reference code's BatchNorm scaling in the G-space optimizers
      (``gsgd(..., bn_scaling=...)``) on chain layers whose output is normalized (only with
      ``normalization='reference'`` on nets with BatchNorm; no effect otherwise): ``'weight'``
      (default), ``'noweight'`` or ``None`` (the chain layout without scaling; ``'none'`` is
      read as ``None``).
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
  bn_scaling: str | None = "weight"
  dtype: str = "float32"
  skeleton: str = "aligned"
  normalize: bool = True
  balance: float = 1.0

  def __post_init__(self):
    for name in self.optimizers:
      if name not in ALL_OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {name!r}; choose from {ALL_OPTIMIZERS}.")
    for name in self.lrs:
      if name not in ALL_OPTIMIZERS:
        raise ValueError(f"Learning rates given for unknown optimizer {name!r}.")
    if self.schedule not in SCHEDULES:
      raise ValueError(f"Unknown schedule {self.schedule!r}; choose from {SCHEDULES}.")
    if self.init not in INITS:
      raise ValueError(f"Unknown init {self.init!r}; choose from {INITS}.")
    if self.normalization not in NORMALIZATIONS:
      raise ValueError(f"Unknown normalization {self.normalization!r}; choose from "
                       f"{NORMALIZATIONS}.")
    if isinstance(self.bn_scaling, str) and self.bn_scaling.lower() == "none":
      object.__setattr__(self, "bn_scaling", None)
    if self.bn_scaling not in BN_SCALINGS:
      raise ValueError(f"Unknown bn_scaling {self.bn_scaling!r}; choose from {BN_SCALINGS}.")
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
    # (momentum and Adam grids one half-decade wider: with each skeleton edge at its channel
    # pair's largest tap, both G-space optimizers chose the top of the shared grids)
    "default-mnist1d-cnn": [("default-mnist1d-cnn", ExperimentConfig(
        dataset="mnist1d", model="cnn1d", width=32, depth=3, epochs=20, batch_size=64,
        **{**_DEFAULT, "lrs": {**_DEFAULT_GRIDS,
                               "sgd_momentum": _DEFAULT_GRIDS["sgd_momentum"] + (1.0,),
                               "gsgd_momentum": _DEFAULT_GRIDS["gsgd_momentum"] + (1.0,),
                               "adam": _DEFAULT_GRIDS["adam"] + (0.1,),
                               "gsgd_adam": _DEFAULT_GRIDS["gsgd_adam"] + (0.1,)}}))],
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

# ------------------------------------------------------------------------------------------------
# BatchNorm networks (issue 11)
# ------------------------------------------------------------------------------------------------

# Comparisons: parts that are G-space settings of one network, merged by run_preset into one table
# ``<out>/<comparison>/table.md`` (gsgd_jax.lab.report.merge_settings).
COMPARISONS: dict[str, tuple[str, ...]] = {}

# Depth studies: parts that differ only in the network's depth, merged by run_preset into one
# table and one figure against depth (gsgd_jax.lab.report.depth_study): study -> ((part, depth),).
DEPTH_STUDIES: dict[str, tuple[tuple[str, int], ...]] = {}


def setting_label(config: ExperimentConfig) -> str:
  """The G-space setting of a BatchNorm net in a table: ``'fallback'`` (normalized layers outside
  G-space), ``'reference'`` (chains through BatchNorm, no scaling) or ``'reference+<scaling>'``.

  Args:
    config: the configuration; only ``normalization`` and ``bn_scaling`` are read.

  Returns:
    ``'fallback'`` if ``config.normalization == 'fallback'``, else ``'reference'`` when
    ``config.bn_scaling`` is None and ``'reference+<bn_scaling>'`` otherwise.
  """
  if config.normalization == "fallback":
    return "fallback"
  return "reference" if config.bn_scaling is None else f"reference+{config.bn_scaling}"


# The three settings of a BatchNorm net: exact (normalized layers leave G-space: a BN net has
# nothing in it, so G-SGD is SGD there), the reference code's chains through BatchNorm without
# and with its weight-norm scaling.
BN_SETTINGS = (("fallback", {"normalization": "fallback", "bn_scaling": None}),
               ("reference", {"normalization": "reference", "bn_scaling": None}),
               ("reference-weight", {"normalization": "reference", "bn_scaling": "weight"}))
_BN_BASELINES = ("sgd_momentum", "adam")
_BN_GSPACE = ("gsgd_momentum",)
# G-space Adam runs in the reference settings only: under fallback nothing is in G-space, so it
# would be Adam, run for run.
_BN_GSPACE_REFERENCE = ("gsgd_momentum", "gsgd_adam")


def bn_comparison(name: str, base: ExperimentConfig,
                  gspace_lrs: Mapping[str, tuple[float, ...]] | None = None
                  ) -> list[tuple[str, ExperimentConfig]]:
  """The parts ``<name>-<setting>`` of one BatchNorm net, registered in :data:`COMPARISONS`.

  The baselines (SGD+momentum, Adam) run once, in the first part; G-SGD with momentum runs in
  each of :data:`BN_SETTINGS`, G-space Adam in the two ``reference`` ones (under ``fallback``
  nothing is in G-space and it would be Adam). Everything else (init, data order, schedule,
  budget) is ``base``'s.

  Args:
    name: the comparison (and the prefix of the part names).
    base: the configuration shared by the parts (its ``lrs`` hold every optimizer's grid).
    gspace_lrs: optional G-SGD with momentum grid per setting name (overrides ``base.lrs``).

  Returns:
    A list of ``(part name, config)``, one per setting of :data:`BN_SETTINGS` in that order
    (``<name>-fallback``, ``<name>-reference``, ``<name>-reference-weight``); as a side effect,
    ``COMPARISONS[name]`` is set to the part names.
  """
  parts = []
  for i, (tag, kw) in enumerate(BN_SETTINGS):
    lrs = dict(base.lrs)
    if gspace_lrs and tag in gspace_lrs:
      lrs.update({o: tuple(gspace_lrs[tag]) for o in _BN_GSPACE})
    opts = _BN_BASELINES + _BN_GSPACE if i == 0 else _BN_GSPACE_REFERENCE
    parts.append((f"{name}-{tag}", base.replace(optimizers=opts, lrs=lrs, **kw)))
  COMPARISONS[name] = tuple(part for part, _ in parts)
  return parts


# Grids from 1-seed pilots (digits and MNIST, both settings of `reference`): every optimizer's
# best value lies inside them (a selected lr at an edge is marked in the tables). G-space Adam:
# Adam's grid and one half decade more on top (its 1-seed pilot on the PlainNets peaked at 0.01 to
# 0.1, with a flat validation accuracy on digits up to 0.1).
_BN_GRIDS = {"sgd_momentum": (0.03, 0.1, 0.3, 1.0), "gsgd_momentum": (0.03, 0.1, 0.3, 1.0),
             "adam": (3e-3, 1e-2, 3e-2, 1e-1), "gsgd_adam": (3e-3, 1e-2, 3e-2, 1e-1, 0.3)}
# Small BN nets sized for ~25 min of bn-all on 2 CPU cores: 8 and 16 channels, two convs
# (PlainNet) or basic blocks (ResNet; one on MNIST's 28x28 inputs) per stage, the model's own
# (flax default) init for every optimizer, library defaults otherwise.
_BN = dict(init="default", seeds=5, lrs=_BN_GRIDS, schedule="cosine")
_BN_PLAIN = {"norm": True, "stage_sizes": (2, 2), "widths": (8, 16)}
_BN_RES = {"norm": True, "stage_sizes": (2, 2), "widths": (8, 16)}
_BN_DIGITS = dict(dataset="digits", epochs=10, batch_size=32, **_BN)
_BN_MNIST = dict(dataset="mnist", subset=1000, epochs=5, batch_size=16, **_BN)
PRESETS.update({
    "bn-digits-plainnet": bn_comparison("bn-digits-plainnet", ExperimentConfig(
        model="plainnet", model_kwargs=_BN_PLAIN, **_BN_DIGITS)),
    "bn-digits-resnet": bn_comparison("bn-digits-resnet", ExperimentConfig(
        model="resnet", model_kwargs=_BN_RES, **{**_BN_DIGITS, "epochs": 8})),
    "bn-mnist-plainnet": bn_comparison("bn-mnist-plainnet", ExperimentConfig(
        model="plainnet", model_kwargs=_BN_PLAIN, **_BN_MNIST)),
    "bn-mnist-resnet": bn_comparison("bn-mnist-resnet", ExperimentConfig(
        model="resnet", model_kwargs={**_BN_RES, "stage_sizes": (1, 1)}, **_BN_MNIST)),
    # The reference code's recipe on the BN PlainNet: skeleton weights set to 1 (for every
    # optimizer), the j mod h skeleton, plain path coordinates, chains through BatchNorm with the
    # weight-norm scaling, G-SGD with momentum against SGD with momentum.
    "reference-bn-plainnet": [("reference-bn-plainnet", ExperimentConfig(
        model="plainnet", model_kwargs=_BN_PLAIN, **{
            **_BN_DIGITS, "init": "reference", "normalize": False, "skeleton": "modulo",
            "normalization": "reference", "bn_scaling": "weight",
            "optimizers": ("sgd_momentum", "gsgd_momentum")}))],
})
PRESETS["bn-all"] = [part for name in ("bn-digits-plainnet", "bn-digits-resnet",
                                       "bn-mnist-plainnet", "bn-mnist-resnet")
                     for part in PRESETS[name]]


def tiny(config: ExperimentConfig) -> ExperimentConfig:
  """The CI version of a configuration: 1 seed, 2 learning rates, 1 epoch, a small subset.

  Args:
    config: the configuration to shrink.

  Returns:
    A copy of ``config`` with 1 seed, 1 epoch, the second and third learning rates of each
    optimizer's grid (the whole grid if it has only one), at most 256 training examples
    (``subset``), a batch size of at most 32 and, for ``'mlp'`` and ``'cnn1d'``, width and
    depth capped at 16 and 2.
  """
  lrs = {name: config.grid(name)[1:3] or config.grid(name) for name in config.optimizers}
  small = {}
  if config.model in ("mlp", "cnn1d"):
    small = {"width": min(config.width or 16, 16), "depth": min(config.depth or 2, 2)}
  return config.replace(seeds=1, epochs=1, lrs=lrs, subset=min(config.subset or 256, 256),
                        batch_size=min(config.batch_size, 32), **small)


# ------------------------------------------------------------------------------------------------
# Issue 18: the paper's Fashion-MNIST MLPs, and a depth study
# ------------------------------------------------------------------------------------------------

# Fashion-MNIST MLPs (784-w-w-10, flax default init, the library's G-space defaults), plus the
# paper's plain G-SGD from the reference initialization (gsgd_paper) and Path-SGD. 10,000 training
# images (a fixed subset; all 6,000 validation and 10,000 test images) and 8 epochs, so that both
# widths fit in 30 minutes on 2 CPU cores. Twins share a grid; gsgd_paper's and path_sgd's grids
# come from 1-seed pilots at both widths.
_FMNIST_GRIDS = {
    "sgd": (0.03, 0.1, 0.3, 1.0), "gsgd": (0.03, 0.1, 0.3, 1.0),
    "sgd_momentum": (0.003, 0.01, 0.03, 0.1), "gsgd_momentum": (0.003, 0.01, 0.03, 0.1),
    "adam": (3e-4, 1e-3, 3e-3, 1e-2), "gsgd_adam": (3e-4, 1e-3, 3e-3, 1e-2),
    "gsgd_paper": (0.01, 0.03, 0.1, 0.3), "path_sgd": (0.003, 0.01, 0.03, 0.1, 0.3),
}
_FMNIST_OPTS = _DEFAULT_OPTS + ("gsgd_paper", "path_sgd")
_FMNIST = dict(dataset="fashion_mnist", subset=10000, model="mlp", depth=2, epochs=8,
               batch_size=64, init="default", seeds=5, optimizers=_FMNIST_OPTS,
               lrs=_FMNIST_GRIDS)
FMNIST_WIDTHS = (100, 400)
PRESETS["fmnist-mlp"] = [(f"fmnist-mlp-w{w}", ExperimentConfig(width=w, **_FMNIST))
                         for w in FMNIST_WIDTHS]


def depth_study(name: str, base: ExperimentConfig, depths: tuple[int, ...],
                at_depth=None) -> list[tuple[str, ExperimentConfig]]:
  """The parts ``<name>-d<depth>`` of a depth study, registered in :data:`DEPTH_STUDIES`.

  Args:
    name: the study (and the prefix of the part names).
    base: the configuration shared by every depth.
    depths: the depths.
    at_depth: ``(config, depth) -> config``; default: ``config.replace(depth=depth)`` (hidden
      layers of an MLP, convs of a CNN1D).

  Returns:
    A list of ``(part name, config)``, one per depth; as a side effect,
    ``DEPTH_STUDIES[name]`` is set to ``((part, depth), ...)``.
  """
  at_depth = at_depth or (lambda c, d: c.replace(depth=d))
  parts = [(f"{name}-d{d}", at_depth(base, d)) for d in depths]
  DEPTH_STUDIES[name] = tuple((p, d) for (p, _), d in zip(parts, depths))
  return parts


def _plain_cnn_depth(config: ExperimentConfig, depth: int) -> ExperimentConfig:
  """A PlainNet of ``depth`` 3x3 convs in one chain: the stem and ``depth - 1`` stage convs (and,
  for the depths of ``depth-digits-cnn``, that depth's learning-rate grids)."""
  config = config.replace(model_kwargs={**config.model_kwargs, "stage_sizes": (depth - 1,)})
  if depth in _CNN_WINDOWS and config.lrs == {}:
    config = config.replace(lrs=_cnn_depth_grids(depth))
  return config


# Plain ReLU nets (no normalization, no skips) at fixed width, every depth with its own lr choice
# on validation, 3 seeds; twins share a grid. The MLP grids are those of the first run with
# momentum extended upwards (its selected value sat at the top edge); with --reuse only an added
# learning rate is trained.
_DEPTH_GRIDS = {
    "sgd": (0.01, 0.03, 0.1, 0.3, 1.0), "gsgd": (0.01, 0.03, 0.1, 0.3, 1.0),
    "sgd_momentum": (0.001, 0.003, 0.01, 0.03, 0.1, 0.3),
    "gsgd_momentum": (0.001, 0.003, 0.01, 0.03, 0.1, 0.3),
    "adam": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2), "gsgd_adam": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2),
}
# The convnets' optimum moves by two decades between depth 2 and 16, so each depth has its own
# grid: the window, in half decades, around the values selected by a first run over SGD / G-SGD
# 0.003 .. 3, momentum 0.001 .. 1 and Adam 1e-4 .. 3e-2 at every depth, with at least one value
# on each side of each twin's choice (the full grids took 55 minutes of training on the shared 2
# cores; a run does not depend on the rest of its grid, so the tables are the same). Once each
# convolution's skeleton edge sat at its channel pair's largest tap, three G-space choices fell on
# a window's edge, and those windows grew by one half decade (Adam 0.1 at depth 2, SGD 0.03 at
# depth 4, momentum 0.03 at depth 16), for both twins.
_CNN_WINDOWS = {
    2: {"sgd": (0.3, 1.0, 3.0), "sgd_momentum": (0.03, 0.1, 0.3, 1.0),
        "adam": (3e-3, 1e-2, 3e-2, 0.1)},
    4: {"sgd": (0.03, 0.1, 0.3, 1.0), "sgd_momentum": (0.01, 0.03, 0.1, 0.3),
        "adam": (3e-3, 1e-2, 3e-2)},
    8: {"sgd": (0.01, 0.03, 0.1, 0.3), "sgd_momentum": (0.003, 0.01, 0.03, 0.1),
        "adam": (1e-3, 3e-3, 1e-2)},
    16: {"sgd": (0.003, 0.01, 0.03, 0.1), "sgd_momentum": (0.001, 0.003, 0.01, 0.03),
         "adam": (3e-4, 1e-3, 3e-3)},
}
_TWINS = {"gsgd": "sgd", "gsgd_momentum": "sgd_momentum", "gsgd_adam": "adam"}


def _cnn_depth_grids(depth: int) -> dict[str, tuple[float, ...]]:
  w = _CNN_WINDOWS[depth]
  return {**w, **{g: w[t] for g, t in _TWINS.items()}}


_DEPTH = dict(init="default", optimizers=_DEFAULT_OPTS, seeds=3)
DEPTHS = (2, 4, 8, 16)
# Fashion-MNIST MLPs 784-100x depth-10: 5,000 training images (all validation images up to 5,000,
# 5,000 test images), 10 epochs.
PRESETS["depth-fmnist-mlp"] = depth_study("depth-fmnist-mlp", ExperimentConfig(
    dataset="fashion_mnist", subset=5000, model="mlp", width=100, epochs=10, batch_size=64,
    lrs=_DEPTH_GRIDS, **_DEPTH), DEPTHS)
# Plain convnets on the 8x8 digits: a 3x3 stem and depth - 1 3x3 convs of 16 channels, global
# average pooling, a dense head; 20 epochs.
PRESETS["depth-digits-cnn"] = depth_study("depth-digits-cnn", ExperimentConfig(
    dataset="digits", model="plainnet", model_kwargs={"widths": (16,)}, epochs=20,
    batch_size=32, **_DEPTH), DEPTHS, _plain_cnn_depth)
# Both studies and the one depth figure. Over 30 minutes when run from scratch: run the two
# studies into the same --out first, then this preset with --reuse (it only draws the figure).
PRESETS["depth-all"] = PRESETS["depth-fmnist-mlp"] + PRESETS["depth-digits-cnn"]

# The reference code's MNIST setting for all of its 300 epochs, 5 seeds (issue 18; the 100-epoch,
# 3-seed version stays in default-all).
PRESETS["reference-mnist-300"] = [("reference-mnist-300", PRESETS["reference-mnist"][0][1].replace(
    epochs=300, seeds=5))]
