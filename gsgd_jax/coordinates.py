"""The coordinates G-space optimizers work in: one options object, shared by every block.

A G-space optimizer runs an ordinary optimizer on coordinates of the basis-path values ``v``.
Which coordinates is a research choice with several knobs; they live here, in one frozen object
that :func:`gsgd_jax.to_path_gradients`, :func:`gsgd_jax.allocate_path_updates` and every
optimizer built from them take as ``coordinates=``, so no two parts of one optimizer can
disagree. Every choice below is exact (after a step the basis-path values are exactly
``v + sigma du``) and invariant under positive rescaling: ``sigma`` is a function of path values.
"""

from __future__ import annotations

import dataclasses

__all__ = ["PathCoordinates", "PAPER"]


@dataclasses.dataclass(frozen=True)
class PathCoordinates:
  r"""Path coordinates ``u = v / sigma`` of a G-space optimizer, and its skeleton-path guard.

  The defaults are what trains from a model's own initialization (``docs/method.md``);
  :data:`PAPER` is the paper's plain G-SGD on ``v``.

  Attributes:
    normalize: work in ``u = v / sigma`` rather than in ``v``. ``False``: the paper's
      coordinates (``sigma = 1``); ``balance`` and ``fanout_exponent`` are then unused.
    balance: in ``[0, 1]``. ``sigma = s^(1-balance) sigma_bal^balance`` with ``s`` one scale per
      chain fixed at ``init`` (:func:`gsgd_jax.path_scales`) and ``sigma_bal`` the product of the
      path's skeleton weights in a balanced gauge (every skeleton weight on the skeleton path
      through a node ``u`` of magnitude ``|v_skel(u)|^(1/L)``), from the current params at every
      step. ``1``: a non-skeleton weight takes the weight-space optimizer's step in that gauge
      (learning rates have SGD's and Adam's magnitudes); ``0``: one scale per chain.
    fanout_exponent: skeleton-only paths get an extra factor ``n^(-fanout_exponent)`` in
      ``sigma_bal``, ``n`` the non-skeleton kernel entries leaving their skeleton class (1/4,
      1/2 and 1 were measured; 1 trained best on convnets).
    min_ratio: the guard of the weight allocation: the ratio ``R = v'/v`` of each skeleton-only
      path is clipped to ``[min_ratio, 1 / min_ratio]`` in one step, so no skeleton path changes
      sign or collapses. ``None`` disables it (exact always).

  Examples:
    >>> import gsgd_jax
    >>> gsgd_jax.PathCoordinates()
    PathCoordinates(normalize=True, balance=1.0, fanout_exponent=1.0, min_ratio=0.1)
    >>> gsgd_jax.PAPER.normalize
    False
  """

  normalize: bool = True
  balance: float = 1.0
  fanout_exponent: float = 1.0
  min_ratio: float | None = 0.1

  def __post_init__(self):
    if not isinstance(self.normalize, bool):
      raise TypeError(f"normalize must be True or False, got {self.normalize!r}.")
    if not 0.0 <= float(self.balance) <= 1.0:
      raise ValueError(f"balance must be in [0, 1], got {self.balance!r}.")
    if not float(self.fanout_exponent) >= 0.0:
      raise ValueError(f"fanout_exponent must be >= 0, got {self.fanout_exponent!r}.")
    if self.min_ratio is not None and not 0.0 < float(self.min_ratio) < 1.0:
      raise ValueError(f"min_ratio must be in (0, 1) or None, got {self.min_ratio!r}.")

  @property
  def balance_used(self) -> float:
    """The balance the maths sees: 0 without ``normalize``."""
    return float(self.balance) if self.normalize else 0.0

  @property
  def needs_path_scale(self) -> bool:
    """Whether the per-chain scale ``s`` enters ``sigma`` (normalized and ``balance < 1``)."""
    return self.normalize and float(self.balance) < 1.0


PAPER = PathCoordinates(normalize=False, balance=0.0)
"""The paper's G-SGD: SGD (or any optax transform) on the basis-path values ``v`` themselves,
with the default skeleton-path guard ``min_ratio=0.1``. Pair it with the paper's start,
``gsgd_jax.reset_skeleton(structure, params)``, as the reference code does."""
