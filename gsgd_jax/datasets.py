"""Datasets as numpy arrays: MNIST-1D and sklearn digits (built locally), CIFAR and Fashion-MNIST.

Every loader returns a :class:`Dataset` of numpy arrays (``float32`` features, ``int32`` labels)
with a validation split carved deterministically (seeded) from the training set.

Nothing is ever downloaded. MNIST-1D is generated on the fly with the ``mnist1d`` package and the
digits come with scikit-learn. CIFAR-10/100 and Fashion-MNIST are read from their standard
distributions, which you place under ``data_dir`` yourself::

    data_dir/cifar-10-batches-py/{data_batch_1, ..., data_batch_5, test_batch}
    data_dir/cifar-100-python/{train, test}
    data_dir/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]

A missing file raises :class:`FileNotFoundError` naming the file and the expected layout.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import pickle
import random
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
    "iterate_batches",
]

DATASETS = ("mnist1d", "digits", "cifar10", "cifar100", "fashion_mnist")

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


_FASHION_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


def load_fashion_mnist(data_dir: str | os.PathLike | None = None, seed: int = 0,
                       val_fraction: float = 0.1, normalize: bool = False) -> Dataset:
  """Fashion-MNIST from the standard idx files, gzipped or not.

  Files are looked up in ``data_dir``, then in its ``fashion_mnist``, ``fashion-mnist`` and
  ``FashionMNIST/raw`` subfolders.

  Args:
    data_dir: directory holding the idx files. Defaults to ``$GSGD_DATA_DIR`` or ``./data``.
    seed: seed of the validation split.
    val_fraction: fraction of the training set held out for validation (per class).
    normalize: standardize with the training split's mean and std.

  Returns:
    A :class:`Dataset` of ``(N, 28, 28, 1)`` images (in ``[0, 1]`` unless normalized), 10 classes.

  Raises:
    FileNotFoundError: naming the missing file (raw and ``.gz`` names).
  """
  root = _root(data_dir)
  candidates = [root, root / "fashion_mnist", root / "fashion-mnist", root / "FashionMNIST" / "raw"]
  folder = next((d for d in candidates
                 if any((d / (f + s)).is_file() for f in _FASHION_FILES.values()
                        for s in ("", ".gz"))), root)
  layout = "\n".join(f"  {folder}/{f}[.gz]" for f in _FASHION_FILES.values())
  arrays = {}
  for key, fname in _FASHION_FILES.items():
    path = next((folder / (fname + s) for s in ("", ".gz") if (folder / (fname + s)).is_file()),
                None)
    if path is None:
      raise FileNotFoundError(
          f"Missing dataset file: {folder / fname} (or {folder / (fname + '.gz')})\n"
          "Expected layout (nothing is downloaded; place the standard idx files there "
          f"yourself):\n{layout}")
    arrays[key] = _read_idx(path)
  x_train = arrays["x_train"][..., None].astype(np.float32) / 255.0
  x_test = arrays["x_test"][..., None].astype(np.float32) / 255.0
  return _make("fashion_mnist", x_train, arrays["y_train"], x_test, arrays["y_test"], 10,
               val_fraction, seed, stats_axes=(0, 1, 2, 3) if normalize else None)


# ------------------------------------------------------------------------------------------------
# Dispatch and batching
# ------------------------------------------------------------------------------------------------

def load_dataset(name: str, data_dir: str | os.PathLike | None = None, **kwargs: Any) -> Dataset:
  """Loads a dataset by name.

  Args:
    name: one of ``'mnist1d'``, ``'digits'``, ``'cifar10'``, ``'cifar100'``, ``'fashion_mnist'``
      (case and ``-`` / ``_`` are ignored).
    data_dir: root directory for the file-based datasets (ignored by ``mnist1d`` and ``digits``).
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
