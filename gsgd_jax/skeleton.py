"""Choosing the skeleton from the weights: which hidden unit takes which skeleton position.

Any assignment gives a valid basis (the ``j mod h`` convention up to a relabelling of each hidden
layer's units); :func:`align_skeleton` picks the one whose skeleton edges carry large weights, so
skeleton path values and the products ``B``, ``F`` are not tiny. See ``docs/method.md``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gsgd_jax._tree import Path, is_slice, leaf_path, leaves_with_paths, path_str
from gsgd_jax.structure import SKELETONS, BasisPathStructure, Chain, Layer, skeleton_index

__all__ = ["align_skeleton", "with_skeleton", "without_zero_layers"]


_LOG_FLOOR = -69.0  # log|w| of a zero weight (about log(1e-30)): such an edge is avoided


def _concrete_leaves(params: Any, why: str) -> dict[Path, np.ndarray]:
  leaves = leaves_with_paths(params)[0]
  for p, x in leaves:
    if isinstance(x, jax.core.Tracer) or not hasattr(x, "shape") or isinstance(
        x, jax.ShapeDtypeStruct):
      raise ValueError(
          f"{why} needs concrete parameter values, but {path_str(p)!r} is {type(x).__name__}. "
          "Build the structure outside jit from the initialized params, or pass "
          "skeleton='modulo' (chosen from shapes only).")
  return {p: x for p, x in leaves}


def _pair_logs(layer: Layer, kernel) -> tuple[np.ndarray, np.ndarray]:
  """``(log|W|, tap)`` of each channel pair at its largest tap, ``(in, out)`` each (float64,
  zeros floored; flat tap indices). A Dense layer has one tap."""
  k = np.asarray(kernel)
  if not jnp.issubdtype(k.dtype, jnp.floating):  # bfloat16/float16 are floating; ints, complex not
    raise ValueError(f"Kernel {path_str(layer.kernel)!r} has dtype {k.dtype}: G-space needs real "
                     "floating-point weights (cast integer params to float; complex weights have "
                     "no positive rescaling).")
  k = np.abs(k.astype(np.float64)).reshape(layer.num_taps, layer.in_dim, layer.out_dim)
  # The largest tap; ties (all-zero pairs included) go to the centre tap, then to the first.
  k = np.concatenate([k[layer.center_tap][None], k])
  tap = np.argmax(k, axis=0) - 1
  tap = np.where(tap < 0, layer.center_tap, tap)
  with np.errstate(divide="ignore", invalid="ignore"):
    out = np.log(np.max(k, axis=0))
  return np.where(np.isfinite(out), out, _LOG_FLOOR), tap


def _edge_taps(chain: Chain, best_taps: list[np.ndarray]):
  """``Chain.taps`` of an aligned chain: each skeleton edge of a layer with taps at its channel
  pair's largest tap (``best_taps[l]``, ``(in, out)``), or ``None`` when all are central."""
  out = []
  for li, (layer, best) in enumerate(zip(chain.layers, best_taps)):
    if layer.num_taps == 1:
      out.append(None)
      continue
    idx = skeleton_index(chain, li)
    out.append((tuple(int(t) for t in best[idx.in_rows, idx.in_cols]),
                tuple(int(t) for t in best[idx.out_rows, idx.out_cols])))
  taps = dataclasses.replace(chain, taps=tuple(out))
  return None if all(taps.layer_taps(li) is None for li in range(len(out))) else tuple(out)


def _align_chain(chain: Chain, leaves: dict[Path, Any]) -> Chain:
  """The chain with the skeleton positions of each hidden set chosen set after set (a linear
  assignment each) and each skeleton edge at its channel pair's largest tap."""
  if len(chain.layers) == 1:
    return dataclasses.replace(chain, perms=None, taps=None)
  pairs = [_pair_logs(layer, leaves[layer.kernel]) for layer in chain.layers]
  chain = dataclasses.replace(chain, perms=_align_perms(chain, [lg for lg, _ in pairs]), taps=None)
  return dataclasses.replace(chain, taps=_edge_taps(chain, [t for _, t in pairs]))


def _align_perms(chain: Chain, logs: list[np.ndarray]) -> tuple[tuple[int, ...], ...]:
  """Skeleton positions of each hidden set (``logs``: per layer, ``log|w|`` of each channel pair
  at its skeleton tap)."""
  from scipy.optimize import linear_sum_assignment  # scipy ships with jax

  h = chain.widths
  L = len(chain.layers)
  perms = [np.arange(h[0])]
  for k in range(1, L):
    n_prev, n = h[k - 1], h[k]
    w = logs[k - 1][perms[k - 1]]  # rows in skeleton-position order of set k-1
    # Skeleton edges between set k-1 and set k, as (position p, position q) pairs: the incoming
    # edge of every q, and (set k-1 hidden) the outgoing edge of every p.
    edges = {(q % n_prev, q) for q in range(n)}
    if k > 1:
      edges |= {(p, p % n) for p in range(n_prev)}
    ps, qs = (np.asarray(a) for a in zip(*sorted(edges)))
    cost = np.zeros((n, n))
    np.add.at(cost, qs, w[ps])
    cost /= np.bincount(qs, minlength=n)[:, None]
    if k == L - 1:  # last hidden set: its outgoing edges to the (fixed) outputs as well
      cost += logs[k][:, np.arange(n) % h[L]].T
    rows, cols = linear_sum_assignment(cost, maximize=True)
    perm = np.empty(n, np.int64)
    perm[rows] = cols
    # Positions with the same skeleton edges (a set wider than the one before: several positions
    # share a parent) have identical cost rows, so the solver's order among them is arbitrary.
    # Order the units it gave such a group by an invariant key instead: the log of the incoming
    # skeleton weight plus the mean log|w| of the unit's outgoing weights (a rescaling of the unit
    # cancels; the parent's and the children's factors are common to the group).
    # (The last hidden set's cost already cancels the unit's factor: its own value is the key.)
    unit_key = np.empty(n)
    unit_key[perm] = cost[np.arange(n), perm] + (logs[k].mean(axis=1)[perm] if k < L - 1 else 0.0)
    groups: dict[tuple, list[int]] = {}
    for q in range(n):
      groups.setdefault((tuple(ps[qs == q]), q % h[L] if k == L - 1 else None), []).append(q)
    for group in groups.values():
      if len(group) > 1:
        units = perm[group]
        perm[group] = units[np.argsort(-unit_key[units], kind="stable")]
    perms.append(perm)
  return tuple(tuple(int(i) for i in p) for p in perms[1:])


def align_skeleton(structure: BasisPathStructure, params: Any) -> BasisPathStructure:
  """The structure with each chain's skeleton chosen from the weights of ``params``.

  Any assignment of a hidden layer's units to skeleton positions gives a valid basis (the ``j mod
  h`` convention up to a relabelling), and the G-space update is exact for every one of them. This
  picks, hidden set after hidden set (inputs first), the assignment that maximizes the mean of
  ``log|w|`` over the skeleton edges at each position (the last hidden set also counts its edges
  to the outputs): skeleton edges carry large weights, so skeleton path values and the products
  ``B``, ``F`` are not tiny. Each step is a linear assignment
  (``scipy.optimize.linear_sum_assignment``, ``O(h^3)``; about 1 s for 4096 units).

  In a convolution every tap of a channel pair is an edge between the same two channels, so any
  one of them can be the pair's skeleton edge. The skeleton edge of each pair is its largest tap
  (``Chain.taps``; ties go to the centre tap), and the assignment above uses that tap's weight. A
  centre tap can be tiny where the others are not (a one-input-channel first layer has no other
  choice of edge), which made some path values vanish and G-space steps blow up.

  The choice is invariant under the positive scaling group: rescaling hidden unit ``u`` by ``c``
  adds ``log c`` to every entry of ``u``'s column (the mean over a position's edges into ``u``
  makes that exactly ``log c``, and the last set's outgoing term subtracts it), so every
  assignment's total shifts by the same constant, while the previous set's factors shift whole
  rows. Every tap of a channel pair scales by the same factor, so the largest tap stays the
  largest. A rescaled network gets the same skeleton. Ties between assignments (for example equal
  weights) are broken by the solver.

  Args:
    structure: a structure (its current skeleton is ignored).
    params: params with concrete values (outside jit); they are not modified.

  Returns:
    The structure with ``Chain.perms`` and ``Chain.taps`` set (static data: hashable, usable as a
    jit static arg).

  Examples:
    >>> import jax.numpy as jnp
    >>> params = {'Dense_0': {'kernel': jnp.array([[0.1, 2.0], [3.0, 0.2]])},
    ...           'Dense_1': {'kernel': jnp.array([[1.0], [1.0]])}}
    >>> import gsgd_jax
    >>> align_skeleton(gsgd_jax.infer_structure(params, skeleton="modulo"), params).chains[0].perms
    ((1, 0),)
  """
  _concrete_leaves(params, "skeleton='aligned'")
  leaves = structure.check(params)
  chains = tuple(_align_chain(c, leaves) for c in structure.chains)
  return dataclasses.replace(structure, chains=chains)


def with_skeleton(structure: BasisPathStructure, params: Any, skeleton: str) -> BasisPathStructure:
  """``structure`` with the ``skeleton`` of :data:`SKELETONS` (``"aligned"``: from ``params``).

  Args:
    structure: the basis-path structure (its chains are kept, only the skeleton changes).
    params: concrete params (read by ``"aligned"`` only).
    skeleton: ``"aligned"`` or ``"modulo"``.

  Returns:
    The structure with the chosen skeleton.
  """
  if skeleton not in SKELETONS:
    raise ValueError(f"Unknown skeleton {skeleton!r}: choose one of {SKELETONS}.")
  structure = without_zero_layers(structure, params)
  if skeleton == "aligned":
    return align_skeleton(structure, params)
  return dataclasses.replace(structure, chains=tuple(
      dataclasses.replace(c, perms=None, taps=None) for c in structure.chains))


ZERO_NOTE = ("its kernel is all zeros (a zero-initialized layer): every basis path through it "
             "has value 0 and it has no non-zero skeleton, so it is trained outside G-space by "
             "the fallback (build the structure again once it is non-zero to bring it in)")
STACK_NOTE = ("a stacked leaf (scanned layers) with an all-zero slice: the stack is trained "
              "outside G-space as a whole, since it cannot be held in part")
ALONE_NOTE = ("left alone in its chain once the zero-initialized layer {} was taken out: a single "
              "layer gains nothing from G-space")


def without_zero_layers(structure: BasisPathStructure, params: Any) -> BasisPathStructure:
  """``structure`` with every chain layer whose kernel is all zeros moved to the fallback.

  A zero-initialized layer (a zero head, common in vision models) has no basis of non-zero
  paths, so G-space cannot hold it; the chain is split around it (pieces of one layer go to the
  fallback too), each moved leaf with a note. The params are not changed, so the model's output
  is the same. Values are read only when ``params`` holds concrete arrays.

  Args:
    structure: the structure.
    params: the params (tracers and shape placeholders: nothing is read, nothing moved).

  Returns:
    The structure without zero layers in its chains.
  """
  leaves = structure.leaves(params)

  def zero(path: Path) -> bool:
    x = leaves.get(path)
    if not isinstance(x, (np.ndarray, jax.Array)) or isinstance(x, jax.core.Tracer):
      return False
    return not np.any(np.asarray(x))

  zero_kernels = {l.kernel for c in structure.chains for l in c.layers if zero(l.kernel)}
  if not zero_kernels:
    return structure
  # A stacked leaf (scanned layers) is in G-space whole or not at all: a zero slice, or a slice
  # left alone by the split, takes the whole stack out (repeated until nothing changes).
  layers = [l for c in structure.chains for l in c.layers]

  def pieces(removed):
    for c in structure.chains:
      piece = []
      for layer in list(c.layers) + [None]:
        if layer is not None and layer.kernel not in removed:
          piece.append(layer)
          continue
        if piece:
          yield c, layer, piece
        piece = []

  removed = set(zero_kernels)
  while True:
    stacks = {p[:-1] for p in removed if is_slice(p)}
    removed |= {l.kernel for l in layers if is_slice(l.kernel) and l.kernel[:-1] in stacks}
    alone = {p[0].kernel for _, _, p in pieces(removed) if len(p) == 1 and is_slice(p[0].kernel)}
    if not alone:
      break
    removed |= alone

  chains, fallback, notes = [], list(structure.fallback), list(structure.notes)

  def drop(layer: Layer, note: str):
    for p in (layer.kernel, layer.bias):
      if p is not None and leaf_path(p) not in fallback:
        fallback.append(leaf_path(p))
        notes.append((leaf_path(p), note))

  for layer in layers:
    if layer.kernel in zero_kernels:
      drop(layer, ZERO_NOTE)
  for layer in layers:
    if layer.kernel in removed:
      drop(layer, STACK_NOTE)
  for c, stop, piece in pieces(removed):
    if len(piece) >= 2:
      chains.append(Chain(tuple(piece)))
    else:
      zeros = [l for l in c.layers if l.kernel in zero_kernels]
      drop(piece[0], ALONE_NOTE.format(repr(path_str((zeros or c.layers)[0].kernel))))
  return dataclasses.replace(structure, chains=tuple(chains), fallback=tuple(fallback),
                             notes=tuple(notes))
