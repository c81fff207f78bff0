"""Demo: an MLP on MNIST-1D trained with SGD and with G-SGD, compared like for like.

Run ``python -m gsgd_jax.lab.demo`` (or ``make demo``). Both optimizers start from the same
initialization (flax's default, He), see the same minibatches and the same constant learning rate
grid; G-SGD gets the one extra call it needs, a structure built from the initial params (skeleton
aligned to those weights; normalized path coordinates are the optimizer's default); the learning rate of each is picked on a validation split and
the test accuracy is reported for that choice, as mean and spread over seeds. Prints a table and
writes a plot of the training loss curves (``gsgd_demo.png`` unless ``--plot`` says otherwise).
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import numpy as np
import optax

import gsgd_jax
from gsgd_jax.lab import datasets, models, training


def run(epochs: int = 40, seeds: int = 3, lrs=(0.03, 0.1, 0.3, 1.0), width: int = 128, depth: int = 4,
        batch_size: int = 64, plot: str | None = "gsgd_demo.png", out=sys.stdout) -> dict:
  """Trains both optimizers over ``lrs`` x ``seeds``; returns ``{name: {lr: [TrainResult]}}``.

  Prints the runs and the best-lr table (chosen by mean final validation accuracy) to ``out``.

  Args:
    epochs: training epochs per run.
    seeds: number of seeds (``0 .. seeds-1``); each fixes the init shared by both optimizers and
      the data order.
    lrs: the constant learning rates tried for each optimizer.
    width: hidden width of the MLP.
    depth: number of hidden layers of the MLP.
    batch_size: minibatch size.
    plot: path of the loss / test-accuracy plot at each optimizer's best lr; no plot if None.
    out: text stream the progress and the table are printed to.

  Returns:
    ``{'SGD': {lr: [TrainResult, ...]}, 'G-SGD': {...}}``, one ``TrainResult`` per seed (with
    ``params`` set to None to free memory).
  """
  data = datasets.load_mnist1d()
  model = models.MLP(features=(width,) * depth, num_classes=data.num_classes)
  optimizers = {"SGD": lambda lr, structure: optax.sgd(lr),
                "G-SGD": lambda lr, structure: gsgd_jax.gsgd(lr, structure=structure)}
  results: dict = {name: {} for name in optimizers}
  start = time.perf_counter()
  print(f"MNIST-1D: {len(data.x_train)} train / {len(data.x_val)} val / {len(data.x_test)} test; "
        f"MLP 40-{'x'.join([str(width)] * depth)}-10, batch {batch_size}, {epochs} epochs, "
        f"lrs {list(lrs)}, {seeds} seeds", file=out)
  for seed in range(seeds):
    params = model.init(jax.random.PRNGKey(seed), data.x_train[:1])["params"]  # same start for both
    structure = gsgd_jax.infer_structure(params)  # skeleton aligned to this seed's weights
    for name, make in optimizers.items():
      for lr in lrs:
        res = training.train_classifier(model, {"params": params}, make(lr, structure), data,
                                        epochs=epochs,
                                        batch_size=batch_size, seed=seed)
        res.params = None
        results[name].setdefault(lr, []).append(res)
        print(f"  seed {seed} {name:<6} lr {lr:<5}: train loss {res.train_loss[-1]:.4f}, "
              f"val acc {res.val_accuracy[-1]:.3f}, test acc {res.test_accuracy[-1]:.3f} "
              f"({res.wall_time:.1f}s)", file=out)

  print("\nBest learning rate per optimizer (by mean final validation accuracy):", file=out)
  print(f"{'optimizer':<8} {'lr':>6} {'train loss':>18} {'test accuracy':>18}", file=out)
  best = {}
  for name, per_lr in results.items():
    lr = max(per_lr, key=lambda k: np.nanmean([r.val_accuracy[-1] for r in per_lr[k]]))
    best[name] = lr
    tl = np.array([r.train_loss[-1] for r in per_lr[lr]])
    ta = np.array([r.test_accuracy[-1] for r in per_lr[lr]])
    print(f"{name:<8} {lr:>6} {tl.mean():>10.4f} ± {tl.std():.4f} {ta.mean():>10.3f} ± {ta.std():.3f}",
          file=out)
  print(f"(mean ± std over {seeds} seeds; total {time.perf_counter() - start:.0f}s)", file=out)

  if plot:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for name, per_lr in results.items():
      curves = np.array([r.train_loss for r in per_lr[best[name]]])
      acc = np.array([r.test_accuracy for r in per_lr[best[name]]])
      x = np.arange(1, curves.shape[1] + 1)
      for a, y, label in ((ax[0], curves, "train loss"), (ax[1], acc, "test accuracy")):
        a.plot(x, y.mean(0), label=f"{name} (lr {best[name]})")
        a.fill_between(x, y.min(0), y.max(0), alpha=0.2)
        a.set_xlabel("epoch")
        a.set_ylabel(label)
    ax[0].set_yscale("log")
    ax[0].legend()
    fig.suptitle("MNIST-1D MLP: SGD vs G-SGD (best lr each, band = min/max over seeds)")
    fig.tight_layout()
    fig.savefig(plot, dpi=100)
    print(f"plot written to {plot}", file=out)
  return results


def main(argv=None) -> None:
  """Command-line entry point (``python -m gsgd_jax.lab.demo``): parses the flags, runs :func:`run`.

  Args:
    argv: the command-line arguments (without the program name); ``sys.argv[1:]`` if None.

  Returns:
    None (the results are printed, and the plot is written unless ``--plot ''``).
  """
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--epochs", type=int, default=40)
  p.add_argument("--seeds", type=int, default=3)
  p.add_argument("--lrs", type=float, nargs="+", default=[0.03, 0.1, 0.3, 1.0])
  p.add_argument("--width", type=int, default=128)
  p.add_argument("--depth", type=int, default=4)
  p.add_argument("--plot", default="gsgd_demo.png", help="output image ('' for none)")
  a = p.parse_args(argv)
  run(epochs=a.epochs, seeds=a.seeds, lrs=tuple(a.lrs), width=a.width, depth=a.depth,
      plot=a.plot or None)


if __name__ == "__main__":
  main()
