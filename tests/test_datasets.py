"""Dataset loaders: tiny files in each standard format, generated datasets, batching."""

import gzip
import pickle
import struct

import jax
import numpy as np
import pytest

from gsgd_jax import datasets


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
