"""A small, fast classification training loop for linen models and any optax optimizer.

One jitted ``lax.scan`` per epoch (shuffled minibatches, softmax cross-entropy), BatchNorm
statistics handled when the model has them, evaluation in chunks. Used by the demo and the
experiment runner so that every optimizer gets exactly the same loop, data order and budget.

The compiled epoch is cached per ``(model, tx, batch_size)`` (a small LRU cache; the data are
arguments, not constants), so calling :func:`train_classifier` again with the same optimizer
object reuses the compilation. Together with ``optax.inject_hyperparams`` and the
``hyperparams=`` argument, one compiled step serves a whole learning-rate grid.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = ["TrainResult", "train_classifier", "evaluate", "set_hyperparams"]


@dataclasses.dataclass
class TrainResult:
  """Curves and final numbers of one training run (plain Python lists/floats, JSON-ready)."""

  train_loss: list[float]       # mean training loss of each epoch
  val_accuracy: list[float]     # after each epoch
  test_accuracy: list[float]    # after each epoch
  wall_time: float              # seconds, including compilation
  params: Any = dataclasses.field(repr=False, default=None)
  batch_stats: Any = dataclasses.field(repr=False, default=None)

  @property
  def final(self) -> dict[str, float]:
    return {"train_loss": self.train_loss[-1], "val_accuracy": self.val_accuracy[-1],
            "test_accuracy": self.test_accuracy[-1]}


def _loss_fn(model, params, batch_stats, x, y, train: bool):
  variables = {"params": params}
  if batch_stats is not None:
    variables["batch_stats"] = batch_stats
    logits, new_state = model.apply(variables, x, train=train, mutable=["batch_stats"])
    new_stats = new_state["batch_stats"]
  else:
    logits = model.apply(variables, x, train=train)
    new_stats = None
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return loss, new_stats


@functools.partial(jax.jit, static_argnums=0)
def _count_correct(model, params, batch_stats, xb, yb):
  variables = {"params": params}
  if batch_stats is not None:
    variables["batch_stats"] = batch_stats
  logits = model.apply(variables, xb, train=False)
  return jnp.sum(jnp.argmax(logits, -1) == yb)


def evaluate(model, params, batch_stats, x, y, chunk: int = 2048) -> float:
  """Accuracy of ``model`` on ``(x, y)``, evaluated in chunks (inference-mode BatchNorm).

  Args:
    model: the linen module.
    params: its parameters.
    batch_stats: its BatchNorm statistics, or None for a net without BatchNorm.
    x: inputs.
    y: integer labels.
    chunk: examples per jitted forward pass.

  Returns:
    The fraction of examples whose argmax logit equals the label (0 for an empty set).
  """
  correct = 0
  for i in range(0, len(x), chunk):
    correct += int(_count_correct(model, params, batch_stats, jnp.asarray(x[i:i + chunk]),
                                  jnp.asarray(y[i:i + chunk])))
  return correct / max(len(x), 1)


@functools.lru_cache(maxsize=16)
def _epoch_function(model, tx: optax.GradientTransformation, batch_size: int, loop: str):
  """The epoch ``(params, batch_stats, opt_state, key, x, y) -> (..., mean loss)``.

  ``loop='scan'``: one jitted ``lax.scan`` over the minibatches. ``loop='python'``: a jitted step
  called from Python for each minibatch (the same minibatches in the same order). Cached on
  ``(model, tx, batch_size, loop)``: optax transforms hash by the identity of their functions,
  linen modules by their fields. ``jax.jit`` retraces only for new shapes or dtypes.
  """

  def batches(key, n):
    steps = n // batch_size
    return jax.random.permutation(key, n)[: steps * batch_size].reshape(steps, batch_size)

  def step(params, batch_stats, opt_state, idx, x_train, y_train):
    xb, yb = x_train[idx], y_train[idx]
    (loss, new_stats), grads = jax.value_and_grad(
        lambda p: _loss_fn(model, p, batch_stats, xb, yb, True), has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, new_stats, opt_state, loss

  if loop == "scan":
    @jax.jit
    def scan_epoch(params, batch_stats, opt_state, key, x_train, y_train):
      def body(carry, idx):
        *carry, loss = step(*carry, idx, x_train, y_train)
        return tuple(carry), loss

      (params, batch_stats, opt_state), losses = jax.lax.scan(
          body, (params, batch_stats, opt_state), batches(key, x_train.shape[0]))
      return params, batch_stats, opt_state, jnp.mean(losses)

    return scan_epoch

  jit_batches = jax.jit(batches, static_argnums=1)
  jit_step = jax.jit(lambda params, batch_stats, opt_state, perm, i, x, y: step(
      params, batch_stats, opt_state, perm[i], x, y))

  def python_epoch(params, batch_stats, opt_state, key, x_train, y_train):
    perm = jit_batches(key, x_train.shape[0])
    losses = []
    for i in range(perm.shape[0]):
      params, batch_stats, opt_state, loss = jit_step(params, batch_stats, opt_state, perm, i,
                                                      x_train, y_train)
      losses.append(loss)
    return params, batch_stats, opt_state, jnp.mean(jnp.stack(losses))

  return python_epoch


def _default_loop(params) -> str:
  """``'python'`` for convolutional nets on CPU, else ``'scan'``.

  XLA:CPU runs the weight-gradient convolution inside a ``lax.scan`` (a while loop) about 30x
  slower than in a standalone computation (measured with jax 0.10, CPU), so convolutional models
  (any kernel with 3 or more dimensions) step from Python there.
  """
  if jax.default_backend() != "cpu":
    return "scan"
  has_conv = any(np.ndim(x) >= 3 for x in jax.tree_util.tree_leaves(params))
  return "python" if has_conv else "scan"


def set_hyperparams(opt_state: Any, values: Mapping[str, Any]) -> Any:
  """Overrides hyperparameters injected with ``optax.inject_hyperparams`` in an optimizer state.

  Every ``InjectHyperparamsState`` inside ``opt_state`` (also nested in chains or partitions)
  gets the named entries replaced, keeping each entry's dtype, shape and weak type, so a compiled
  update accepts the new state without retracing.

  Args:
    opt_state: the state returned by ``tx.init``.
    values: ``{name: value}``, e.g. ``{'learning_rate': 0.03}``.

  Returns:
    The new state.

  Raises:
    KeyError: if a name is not an injected hyperparameter anywhere in the state.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> tx = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)
    >>> state = set_hyperparams(tx.init({'w': jnp.zeros(2)}), {'learning_rate': 0.5})
    >>> float(state.hyperparams['learning_rate'])
    0.5
  """
  found = set()
  inject_types = (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)

  def is_inject(x):
    return isinstance(x, inject_types)

  def replace(x):
    if not is_inject(x):
      return x
    hp = dict(x.hyperparams)
    for name, v in values.items():
      if name in hp:
        hp[name] = jax.lax.full_like(jnp.asarray(hp[name]), v)  # keeps dtype, shape, weak type
        found.add(name)
    return x._replace(hyperparams=hp)

  new_state = jax.tree_util.tree_map(replace, opt_state, is_leaf=is_inject)
  missing = set(values) - found
  if missing:
    raise KeyError(f"No injected hyperparameter named {sorted(missing)} in the optimizer state; "
                   "build the optimizer with optax.inject_hyperparams(...) and pass those names.")
  return new_state


def train_classifier(model, variables: dict, tx: optax.GradientTransformation, data, *,
                     epochs: int, batch_size: int, seed: int = 0,
                     on_epoch: Callable[[int, float], None] | None = None,
                     hyperparams: Mapping[str, Any] | None = None,
                     loop: str = "auto") -> TrainResult:
  """Trains ``model`` on ``data`` (a :class:`gsgd_jax.lab.datasets.Dataset`) with ``tx``.

  Args:
    model: a linen module called as ``model.apply(variables, x, train=...)``.
    variables: ``{'params': ..., ['batch_stats': ...]}`` to start from.
    tx: any optax optimizer (``update`` receives the params).
    data: the dataset; minibatches come from ``x_train``; accuracy on ``x_val`` and ``x_test``.
    epochs: number of passes over the training set (the last incomplete batch is dropped).
    batch_size: minibatch size.
    seed: seed of the data order (the same for every optimizer given the same seed).
    on_epoch: optional callback ``(epoch, train_loss)``, e.g. for a progress bar.
    hyperparams: values of hyperparameters injected with ``optax.inject_hyperparams`` (e.g.
      ``{'learning_rate': 0.03}``), set in the initial optimizer state with
      :func:`set_hyperparams`. Passing the same ``tx`` with different values reuses the compiled
      epoch (no recompilation across a learning-rate grid).
    loop: ``'scan'`` (one compiled ``lax.scan`` per epoch), ``'python'`` (a compiled step per
      minibatch, called from Python) or ``'auto'`` (``'python'`` for convolutional nets on CPU,
      where XLA runs convolution gradients inside loops slowly; ``'scan'`` otherwise). The
      minibatches are the same, the results equal up to float rounding.

  Returns:
    A :class:`TrainResult`. Non-finite losses are recorded as ``nan`` and training stops early.
  """
  params = variables["params"]
  batch_stats = variables.get("batch_stats")
  x_train = jnp.asarray(data.x_train)
  y_train = jnp.asarray(data.y_train)
  n = x_train.shape[0]
  steps = n // batch_size
  if steps == 0:
    raise ValueError(f"batch_size {batch_size} exceeds the training set size {n}.")
  opt_state = tx.init(params)
  if hyperparams:
    opt_state = set_hyperparams(opt_state, hyperparams)
  if loop == "auto":
    loop = _default_loop(params)
  if loop not in ("scan", "python"):
    raise ValueError(f"loop must be 'auto', 'scan' or 'python', got {loop!r}.")
  epoch_fn = _epoch_function(model, tx, int(batch_size), loop)

  key = jax.random.PRNGKey(seed)
  result = TrainResult([], [], [], 0.0)
  start = time.perf_counter()
  for epoch in range(epochs):
    key, sub = jax.random.split(key)
    params, batch_stats, opt_state, loss = epoch_fn(params, batch_stats, opt_state, sub, x_train,
                                                    y_train)
    loss = float(loss)
    result.train_loss.append(loss if np.isfinite(loss) else float("nan"))
    result.val_accuracy.append(evaluate(model, params, batch_stats, data.x_val, data.y_val))
    result.test_accuracy.append(evaluate(model, params, batch_stats, data.x_test, data.y_test))
    if on_epoch is not None:
      on_epoch(epoch, loss)
    if not np.isfinite(loss):
      break
  result.wall_time = time.perf_counter() - start
  result.params, result.batch_stats = params, batch_stats
  return result
