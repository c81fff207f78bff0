"""A structure as JSON text (to save beside a checkpoint) and its skeleton fingerprint.

The JSON holds everything a :class:`~gsgd_jax.BasisPathStructure` is made of: chains, layers
(paths, shapes, taps, flags), the skeleton assignment of every hidden set (``Chain.perms``) and
the tap of every skeleton edge of a convolution (``Chain.taps``), the fallback leaves and their
notes. ``from_json(to_json(s)) == s``.

The fingerprint is a 31-bit checksum of the parts that decide which coordinates an optimizer
state lives in (chains, layer shapes, skeleton assignment and taps); G-space optimizer states carry it so
that a state paired with a structure of another skeleton is refused.
"""

from __future__ import annotations

import functools
import json
import zlib

from gsgd_jax._tree import StackIndex

_FORMAT = "gsgd_jax.BasisPathStructure/1"


def _path(p) -> list | None:
  # a slice of a stacked leaf (the last element, a StackIndex) is written {"stack_index": i}
  return None if p is None else [_elem(e) for e in p]


def _elem(e):
  return {"stack_index": e.index} if isinstance(e, StackIndex) else e


def _unpath(p) -> tuple | None:
  if p is None:
    return None
  return tuple(StackIndex(int(e["stack_index"])) if isinstance(e, dict) else e for e in p)


def _layer(layer) -> dict:
  return {"kernel": _path(layer.kernel), "bias": _path(layer.bias),
          "kernel_shape": list(layer.kernel_shape), "taps_shape": list(layer.taps_shape),
          "normalized": layer.normalized}


def _chain(chain) -> dict:
  return {"layers": [_layer(l) for l in chain.layers],
          "perms": None if chain.perms is None else [list(p) for p in chain.perms],
          "taps": _taps(chain.taps)}


def _taps(taps):
  return None if taps is None else [None if t is None else [list(t[0]), list(t[1])] for t in taps]


def _untaps(taps):
  if taps is None:
    return None
  return tuple(None if t is None else (tuple(int(i) for i in t[0]), tuple(int(i) for i in t[1]))
               for t in taps)


def to_dict(structure) -> dict:
  """A JSON-ready dict of ``structure`` (lists, strings, ints, bools, None)."""
  return {"format": _FORMAT,
          "chains": [_chain(c) for c in structure.chains],
          "fallback": [_path(p) for p in structure.fallback],
          "notes": [[_path(p), note] for p, note in structure.notes],
          "bn_scaling": structure.bn_scaling}


def from_dict(d: dict, classes):
  """The structure :func:`to_dict` wrote; ``classes``: ``(Layer, Chain, BasisPathStructure)``
  (passed in: this module imports only the package's pytree helpers)."""
  Layer, Chain, BasisPathStructure = classes  # noqa: N806
  if not isinstance(d, dict) or d.get("format") != _FORMAT:
    raise ValueError(f"Not a saved gsgd_jax structure (expected format {_FORMAT!r}, got "
                     f"{d.get('format') if isinstance(d, dict) else type(d).__name__!r}). Save "
                     "one with structure.to_json().")
  chains = tuple(
      Chain(tuple(Layer(_unpath(l["kernel"]), _unpath(l["bias"]), tuple(l["kernel_shape"]),
                        tuple(l["taps_shape"]), bool(l["normalized"])) for l in c["layers"]),
            None if c["perms"] is None else tuple(tuple(int(i) for i in p) for p in c["perms"]),
            _untaps(c.get("taps")))
      for c in d["chains"])
  return BasisPathStructure(chains, tuple(_unpath(p) for p in d["fallback"]),
                            tuple((_unpath(p), n) for p, n in d["notes"]), d.get("bn_scaling"))


def to_json(structure) -> str:
  return json.dumps(to_dict(structure), separators=(",", ":"))


def from_json(text: str, classes):
  try:
    d = json.loads(text)
  except (TypeError, json.JSONDecodeError) as e:
    raise ValueError(f"Not JSON text of a saved gsgd_jax structure ({e}). Save one with "
                     "structure.to_json().") from None
  return from_dict(d, classes)


def _chain_key(c) -> list:
  moved = c.perms is not None and any(tuple(p) != tuple(range(len(p))) for p in c.perms)
  key = [[(_path(l.kernel), list(l.kernel_shape), list(l.taps_shape)) for l in c.layers],
         [list(p) for p in c.perms] if moved else None]
  taps = [c.layer_taps(li) for li in range(len(c.layers))]
  if any(t is not None for t in taps):  # (absent otherwise: fingerprints from before taps hold)
    key.append([None if t is None else [t[0].tolist(), t[1].tolist()] for t in taps])
  return key


@functools.lru_cache(maxsize=256)
def fingerprint(structure) -> int:
  """A checksum in ``[0, 2**31)`` of the chains, their shapes and skeleton assignment."""
  key = [_chain_key(c) for c in structure.chains]
  return zlib.crc32(json.dumps(key, default=str).encode()) & 0x7FFFFFFF

