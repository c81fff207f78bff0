"""Results of an experiment: per-(optimizer, lr) summaries, the learning rate selected on
validation, markdown tables, CSV files and plots, and the rescaling-invariance comparison.

Works on the run records and ``results.json`` content written by :mod:`gsgd_jax.lab.runner`; needs
matplotlib only for the plots (imported when a plot is drawn).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

__all__ = [
    "summarize",
    "select_best",
    "format_table",
    "plot_curves",
    "plot_lr_sweep",
    "compare_rescaling",
    "merge_settings",
    "depth_table",
    "plot_depth",
    "depth_study",
]


def _lr_tag(lr: float) -> str:
  return f"{lr:g}"


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
  to the lower mean final training loss, then to the smaller learning rate. Means that differ by
  rounding only (the same accuracies summed in another order: 0.97342657342657350 against
  0.9734265734265733) are a tie. NaN counts as worst.

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
    val = -math.inf if val is None or not math.isfinite(val) else round(val, 12)
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
  """The best-lr table in markdown: test/val accuracy (%) and final train loss, mean ± std.

  Args:
    results: an experiment's results (as in ``results.json``): reads ``name``, ``config``,
      ``best`` (per optimizer, the row selected on validation), ``median_run_time``, ``data``
      (train/val/test sizes) and ``total_wall_time``.

  Returns:
    The markdown table (one row per optimizer, also the diverged runs and the median seconds per
    run), followed by a line describing the setup.
  """
  cfg = results["config"]
  lines = ["| optimizer | lr (chosen on val) | test acc. (%) | val acc. (%) | final train loss "
           "| diverged | s/run (median) |",
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
  import sys

  import matplotlib
  if "matplotlib.pyplot" not in sys.modules:  # a script: no window; a notebook keeps its backend
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
  """Training loss (log scale) and test accuracy per epoch at each optimizer's selected lr.

  Args:
    records: one record per run (``optimizer``, ``lr``, ``train_loss``, ``test_accuracy``
      curves).
    best: per optimizer, the selected row (its ``lr`` is used), e.g. from :func:`select_best`.
    path: the image file written (line = mean, band = min/max over seeds).
    title: prefix of the figure title.

  Returns:
    None; the figure is saved to ``path``.
  """
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
  """Final test accuracy vs learning rate (mean ± std over seeds); circles mark the val choice.

  Args:
    summary: one row per (optimizer, lr) with ``test_accuracy_mean`` / ``test_accuracy_std``,
      e.g. from :func:`summarize`.
    best: per optimizer, the row selected on validation (its ``lr`` and ``test_accuracy_mean``
      are circled); only these optimizers are plotted.
    path: the image file written.
    title: prefix of the plot title.

  Returns:
    None; the figure is saved to ``path``.
  """
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
# The rescaling comparison (presets whose parts differ only in rescale_init)
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

  Args:
    parts: ``(part name, part directory, results)`` per part, the reference part first; the
      per-run curves are read from ``<part directory>/runs/*.json``.
    out: directory that ``comparison.csv`` and ``invariance.png`` are written to.
    title: prefix of the figure title.

  Returns:
    The markdown table described above, one row per optimizer of the reference part.
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


# ------------------------------------------------------------------------------------------------
# Several G-space settings of one network in one table (e.g. the BatchNorm comparison)
# ------------------------------------------------------------------------------------------------

def merge_settings(parts: Sequence[tuple[str, Path, Mapping[str, Any]]],
                   labels: Mapping[str, str], out: Path, title: str) -> dict:
  """Merges parts that differ only in their G-space setting into one table and one pair of plots.

  Every G-space optimizer (name starting with ``gsgd``) is relabelled ``'<name> [<label>]'`` with
  its part's label; the other optimizers (the weight-space baselines, identical in every setting)
  are kept once, from the first part that ran them. Each entry keeps its own learning rate,
  selected on validation as in a single part.

  Args:
    parts: ``(part name, part directory, results)`` of each part, in table order.
    labels: the setting label of each part (e.g. ``'fallback'``, ``'reference+weight'``).
    out: directory of the merged ``table.md``, ``summary.csv``, ``results.json``,
      ``loss_curves.png`` and ``accuracy_vs_lr.png`` (created).
    title: the title of the table and the plots.

  Returns:
    The merged results (same keys as a part's ``results.json`` plus ``settings``).
  """
  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  records, seen, settings, times = [], set(), [], {}
  for part, d, res in parts:
    cfg = res["config"]
    label = labels[part]
    settings.append({"part": part, "label": label, "normalization": cfg.get("normalization"),
                     "bn_scaling": cfg.get("bn_scaling"), "structure": res.get("structure"),
                     "num_basis_paths": res.get("num_basis_paths"),
                     "normalized_layers": res.get("normalized_layers")})
    for opt in cfg["optimizers"]:
      entry = f"{opt} [{label}]" if opt.startswith("gsgd") else opt
      if entry in seen:
        continue
      seen.add(entry)
      times[entry] = res["median_run_time"][opt]
      for lr in cfg["lrs"][opt]:
        for seed in range(cfg["seeds"]):
          rec = json.loads((Path(d) / "runs" / f"{opt}_lr{_lr_tag(lr)}_seed{seed}.json")
                           .read_text())
          records.append({**rec, "optimizer": entry})
  summary = summarize(records)
  best = select_best(summary)
  for row in summary:
    row["selected"] = best[row["optimizer"]]["lr"] == row["lr"]
  first = parts[0][2]
  merged = {"name": title, "config": first["config"], "data": first["data"], "best": best,
            "summary": summary, "settings": settings, "median_run_time": times,
            "total_wall_time": sum(p[2]["total_wall_time"] for p in parts)}
  lines = [format_table(merged), "", "G-space per setting:"]
  for st in settings:
    n_norm = st["normalized_layers"]
    lines.append(f"- {st['label']} (normalization={st['normalization']!r}, bn_scaling="
                 f"{st['bn_scaling']!r}): {st['num_basis_paths']} basis paths, "
                 f"{'?' if n_norm is None else n_norm} chain layer(s) flagged normalized "
                 f"({st['structure']})")
  table = "\n".join(lines)
  (out / "table.md").write_text(table + "\n")
  _write_csv(out / "summary.csv", summary)
  (out / "results.json").write_text(json.dumps({**merged, "table": table}, indent=2) + "\n")
  plot_curves(records, best, out / "loss_curves.png", title=title)
  plot_lr_sweep(summary, best, out / "accuracy_vs_lr.png", title=title)
  return merged


# ------------------------------------------------------------------------------------------------
# Depth studies: one network family at several depths
# ------------------------------------------------------------------------------------------------

# Weight-space optimizer -> its G-space twin; a twin pair shares a colour in the depth figure
# (weight space: solid line, circles; G-space: dashed line, squares).
TWINS = (("sgd", "gsgd"), ("sgd_momentum", "gsgd_momentum"), ("adam", "gsgd_adam"))
_TWIN_COLORS = {"sgd": "C0", "gsgd": "C0", "sgd_momentum": "C1", "gsgd_momentum": "C1",
                "adam": "C2", "gsgd_adam": "C2", "gsgd_paper": "C3", "path_sgd": "C4"}


def _line_style(opt: str) -> dict:
  gspace = opt.startswith("gsgd")
  return {"color": _TWIN_COLORS.get(opt, "C7"), "linestyle": "--" if gspace else "-",
          "marker": "s" if gspace else "o", "mfc": "none" if gspace else None}


def depth_table(parts: Sequence[tuple[int, Mapping[str, Any]]], title: str = "") -> str:
  """Markdown tables of a depth study: test accuracy, final train loss and the G-space margins.

  Args:
    parts: ``(depth, results)`` per depth (``results`` as in a part's ``results.json``).
    title: a name for the closing line.

  Returns:
    Three markdown tables, one row per depth: test accuracy (%) at each optimizer's learning rate
    selected on validation (mean ± std over seeds; the lr in brackets, ``*`` at a grid edge,
    ``(k div.)`` when k seeds diverged); final training loss; and each G-space optimizer minus
    its weight-space twin (test accuracy points, with a verdict: ahead or behind by more than the
    larger std, else tie).
  """
  parts = sorted(parts, key=lambda p: p[0])
  opts: list[str] = []
  for _, res in parts:
    opts += [o for o in res["best"] if o not in opts]
  head = "| depth | " + " | ".join(opts) + " |"
  rule = "|---|" + "---|" * len(opts)
  acc, loss = [head, rule], [head, rule]
  for depth, res in parts:
    a, l = [], []
    for o in opts:
      row = res["best"].get(o)
      if row is None:
        a.append("-")
        l.append("-")
        continue
      edge = "*" if row.get("at_grid_edge") else ""
      div = f" ({row['diverged']} div.)" if row.get("diverged") else ""
      a.append(f"{_pm(row['test_accuracy_mean'], row['test_accuracy_std'], 100)} "
               f"({_lr_tag(row['lr'])}{edge}){div}")
      l.append(_pm(row["train_loss_mean"], row["train_loss_std"], 1, 4))
    acc.append(f"| {depth} | " + " | ".join(a) + " |")
    loss.append(f"| {depth} | " + " | ".join(l) + " |")
  pairs = [(w, g) for w, g in TWINS if w in opts and g in opts]
  margin = ["| depth | " + " | ".join(f"{g} - {w}" for w, g in pairs) + " |",
            "|---|" + "---|" * len(pairs)]
  for depth, res in parts:
    cells = []
    for w, g in pairs:
      rw, rg = res["best"].get(w), res["best"].get(g)
      if rw is None or rg is None:
        cells.append("-")
        continue
      d = 100 * (rg["test_accuracy_mean"] - rw["test_accuracy_mean"])
      s = 100 * max(rg["test_accuracy_std"], rw["test_accuracy_std"])
      if not math.isfinite(d):
        cells.append("n/a")
        continue
      verdict = "ahead" if d > s else ("behind" if -d > s else "tie")
      cells.append(f"{d:+.1f} ({verdict}, std {s:.1f})")
    margin.append(f"| {depth} | " + " | ".join(cells) + " |")
  cfg = parts[0][1]["config"]
  total = sum(res.get("train_wall_time", res["total_wall_time"]) for _, res in parts)
  return "\n".join(
      ["Test accuracy (%) at the lr chosen on validation (lr in brackets; * = grid edge):", "",
       *acc, "", "Final training loss:", "", *loss, "",
       "G-space minus weight space (test accuracy points; ahead / behind: by more than the "
       "larger std):", "", *margin, "",
       f"{title}: mean ± std over {cfg['seeds']} seeds, {cfg['epochs']} epochs, batch "
       f"{cfg['batch_size']}, {cfg['schedule']} schedule, init {cfg['init']}; "
       f"{total:.0f}s of training in total (the runs' own times, also for runs reused)."])


def plot_depth(studies: Sequence[tuple[str, Sequence[tuple[int, Mapping[str, Any]]]]],
               path: str | Path, title: str = "") -> None:
  """Test accuracy and final training loss against depth, one line per optimizer.

  Each optimizer is plotted at the learning rate selected on validation at each depth (mean ±
  std over seeds). Twins share a colour (:data:`TWINS`): weight space solid with circles, G-space
  dashed with open squares.

  Args:
    studies: ``(study title, [(depth, results), ...])``; one row of two panels per study.
    path: the image file written.
    title: the figure title.

  Returns:
    None; the figure is saved to ``path``.
  """
  plt = _pyplot()
  n = len(studies)
  fig, axes = plt.subplots(n, 2, figsize=(11, 3.8 * n), squeeze=False)
  for (name, parts), (ax_acc, ax_loss) in zip(studies, axes):
    parts = sorted(parts, key=lambda p: p[0])
    depths = [d for d, _ in parts]
    opts: list[str] = []
    for _, res in parts:
      opts += [o for o in res["best"] if o not in opts]
    for o in opts:
      rows = [res["best"].get(o) for _, res in parts]
      get = lambda k: np.array([np.nan if r is None or r[k] is None else r[k]  # noqa: E731
                                for r in rows], float)
      style = _line_style(o)
      ax_acc.errorbar(depths, 100 * get("test_accuracy_mean"), yerr=100 * get("test_accuracy_std"),
                      capsize=3, label=o, **style)
      ax_loss.errorbar(depths, get("train_loss_mean"), yerr=get("train_loss_std"), capsize=3,
                       label=o, **style)
    for ax in (ax_acc, ax_loss):
      ax.set_xscale("log", base=2)
      ax.set_xticks(depths)
      ax.set_xticklabels([str(d) for d in depths])
      ax.set_xlabel("depth (hidden layers / conv layers)")
      ax.grid(alpha=0.3)
    ax_loss.set_yscale("log")
    ax_acc.set_ylabel("test accuracy (%)")
    ax_loss.set_ylabel("final training loss")
    ax_acc.set_title(f"{name}: test accuracy", fontsize=10)
    ax_loss.set_title(f"{name}: final training loss", fontsize=10)
    ax_acc.legend(fontsize=8, ncol=2)
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def depth_study(parts: Sequence[tuple[int, Mapping[str, Any]]], out: Path, title: str) -> str:
  """Writes a depth study's ``table.md``, ``depth.csv`` and ``depth.png`` into ``out``.

  Args:
    parts: ``(depth, results)`` per depth.
    out: the directory (created).
    title: the study's name.

  Returns:
    The markdown of :func:`depth_table`.
  """
  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  table = depth_table(parts, title)
  (out / "table.md").write_text(table + "\n")
  rows = []
  for depth, res in sorted(parts, key=lambda p: p[0]):
    for o, r in res["best"].items():
      rows.append({"depth": depth, "optimizer": o, "lr": r["lr"],
                   "at_grid_edge": r.get("at_grid_edge"), "seeds": r["seeds"],
                   "diverged": r["diverged"],
                   **{k: r[k] for k in ("test_accuracy_mean", "test_accuracy_std",
                                        "val_accuracy_mean", "val_accuracy_std",
                                        "train_loss_mean", "train_loss_std")}})
  _write_csv(out / "depth.csv", rows)
  plot_depth([(title, parts)], out / "depth.png", title=title)
  return table
