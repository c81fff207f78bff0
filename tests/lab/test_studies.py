"""Issue 18's lab additions at tiny size: the paper's G-SGD from the reference initialization
(``gsgd_paper``) beside the library defaults, the Fashion-MNIST MLP preset on generated idx files,
the depth studies (tables and the depth figure) and the 300-epoch reference MNIST preset."""

import csv
import json
import struct

import jax
import numpy as np
import pytest

import gsgd_jax

from gsgd_jax.lab import cli, report
from gsgd_jax.lab import config as C
from gsgd_jax.lab import runner as R

pytestmark = pytest.mark.usefixtures("fast_compiles")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TWIN = {"gsgd": "sgd", "gsgd_momentum": "sgd_momentum", "gsgd_adam": "adam"}


def _idx_bytes(array):
  header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
  return header + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()


def _write_fashion(root, n=80, side=8):
  """Four idx files of random 8x8 'Fashion-MNIST' images (CI never needs the real data)."""
  rng = np.random.default_rng(0)
  for prefix in ("train", "t10k"):
    (root / f"{prefix}-images-idx3-ubyte").write_bytes(
        _idx_bytes(rng.integers(0, 256, (n, side, side), dtype=np.uint8)))
    (root / f"{prefix}-labels-idx1-ubyte").write_bytes(_idx_bytes(np.arange(n) % 10))


def test_issue18_presets():
  fm = C.PRESETS["fmnist-mlp"]
  assert [c.width for _, c in fm] == list(C.FMNIST_WIDTHS) and len(fm) >= 2
  for _, cfg in fm:
    assert cfg.dataset == "fashion_mnist" and cfg.model == "mlp" and cfg.depth == 2
    assert cfg.seeds == 5 and cfg.init == "default" and cfg.skeleton == "aligned" and cfg.normalize
    assert set(cfg.optimizers) == set(C.OPTIMIZERS) | {"gsgd_paper"}
    for g, w in TWIN.items():  # twins share one grid
      assert cfg.grid(g) == cfg.grid(w)
  for study in ("depth-fmnist-mlp", "depth-digits-cnn"):
    members = C.DEPTH_STUDIES[study]
    assert [d for _, d in members] == list(C.DEPTHS)
    parts = dict(C.PRESETS[study])
    assert [p for p, _ in members] == list(parts)
    for part, depth in members:
      cfg = parts[part]
      assert cfg.seeds >= 3 and cfg.init == "default"
      for g, w in TWIN.items():
        assert g in cfg.optimizers and w in cfg.optimizers and cfg.grid(g) == cfg.grid(w)
      if cfg.model == "mlp":
        assert cfg.depth == depth
      else:  # plain convnet: the stem and depth - 1 convs, no normalization, no skips
        assert cfg.model == "plainnet" and cfg.model_kwargs["stage_sizes"] == (depth - 1,)
        assert not cfg.model_kwargs.get("norm", False)
  assert C.PRESETS["depth-all"] == C.PRESETS["depth-fmnist-mlp"] + C.PRESETS["depth-digits-cnn"]
  ref, ref300 = C.PRESETS["reference-mnist"][0][1], C.PRESETS["reference-mnist-300"][0][1]
  assert ref300 == ref.replace(epochs=300, seeds=5)
  with pytest.raises(ValueError, match="Unknown optimizer"):
    C.ExperimentConfig(optimizers=("gsgd_nope",))


def test_gsgd_paper_starts_from_the_reference_init(tmp_path):
  """gsgd_paper: the j mod h skeleton reset to 1 and plain coordinates; the others: flax's init."""
  cfg = C.ExperimentConfig(dataset="digits", model="mlp", width=8, depth=2, seeds=1, epochs=1,
                           subset=64, batch_size=32, init="default",
                           optimizers=("sgd", "gsgd_paper"),
                           lrs={"sgd": (0.1,), "gsgd_paper": (0.03,)})
  data = R.load_data(cfg)
  model = R.build_model(cfg, data)
  x0 = data.x_train[:1]
  v0 = dict(model.init(jax.random.PRNGKey(0), x0, train=False))
  structure, _ = R.build_structure(cfg, model, v0, x0)
  default = R.initial_variables(cfg, model, structure, x0, 0)["params"]
  paper = R.initial_variables(cfg.replace(init="reference", skeleton="modulo"), model, structure,
                              x0, 0)["params"]
  np.testing.assert_array_equal(paper["Dense_1"]["kernel"][0, 0], 1.0)  # middle diagonal: skeleton
  assert not np.allclose(default["Dense_1"]["kernel"][0, 0], 1.0)
  res = R.run_experiment(cfg, tmp_path, progress=False, verbose=False)
  assert set(res["best"]) == {"sgd", "gsgd_paper"}
  rec = json.loads((tmp_path / "runs" / "gsgd_paper_lr0.03_seed0.json").read_text())
  assert np.isfinite(rec["final"]["train_loss"])
  # The optimizer itself: G-SGD in the paper's coordinates, whatever normalize/balance say.
  tx = R.make_optimizer("gsgd_paper", structure, normalize=True, balance=1.0)
  state = tx.init(paper)
  grads = jax.tree_util.tree_map(np.ones_like, paper)
  ref = gsgd_jax.gsgd(1.0, structure=structure, coordinates=gsgd_jax.PAPER)
  u, _ = tx.update(grads, state, paper)
  u_ref, _ = ref.update(grads, ref.init(paper), paper)
  for a, b in zip(jax.tree_util.tree_leaves(u), jax.tree_util.tree_leaves(u_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  # The command line accepts it.
  out = cli.main(["--dataset", "digits", "--model", "mlp", "--width", "8", "--depth", "1",
                  "--optimizers", "gsgd_paper", "--lr", "gsgd_paper=0.01", "--seeds", "1",
                  "--epochs", "1", "--subset", "64", "--batch-size", "32", "--init", "default",
                  "--out", str(tmp_path / "cli"), "--no-progress"])
  assert list(out["cli"]["best"]) == ["gsgd_paper"]


def test_fmnist_preset_tiny_on_generated_idx(tmp_path):
  data_dir = tmp_path / "data"
  data_dir.mkdir()
  _write_fashion(data_dir)
  out = tmp_path / "out"
  results = R.run_preset("fmnist-mlp", out, tiny_run=True, progress=False, verbose=False,
                         overrides={"data_dir": str(data_dir),
                                    "optimizers": ("gsgd", "gsgd_paper", "path_sgd")},
                         figures=tmp_path / "fig")
  assert set(results) == {p for p, _ in C.PRESETS["fmnist-mlp"]}
  for part, res in results.items():
    assert res["config"]["dataset"] == "fashion_mnist"
    assert set(res["best"]) == {"gsgd", "gsgd_paper", "path_sgd"}
    assert (out / part / "table.md").read_text().count("| gsgd_paper |") == 1
    assert (tmp_path / "fig" / f"{part}-loss_curves.png").read_bytes().startswith(PNG_MAGIC)


def test_depth_study_tables_and_figure(tmp_path, monkeypatch):
  base = C.ExperimentConfig(dataset="digits", model="mlp", width=8, seeds=1, epochs=1,
                            subset=64, batch_size=32, init="default",
                            optimizers=("sgd", "gsgd", "gsgd_paper"),
                            lrs={"sgd": (0.1,), "gsgd": (0.1,), "gsgd_paper": (0.03,)})
  for name in ("tiny-mlp", "tiny-cnn"):  # registered below; removed again after the test
    monkeypatch.setitem(C.DEPTH_STUDIES, name, ())
  parts = C.depth_study("tiny-mlp", base, (1, 3))
  cnn = C.depth_study("tiny-cnn", C.ExperimentConfig(
      dataset="digits", model="plainnet", model_kwargs={"widths": (4,)}, seeds=1, epochs=1,
      subset=64, batch_size=32, init="default", optimizers=("sgd",), lrs={"sgd": (0.1,)}),
      (2, 3), C._plain_cnn_depth)
  assert R.DEPTH_STUDIES["tiny-cnn"] == (("tiny-cnn-d2", 2), ("tiny-cnn-d3", 3))
  monkeypatch.setitem(C.PRESETS, "tiny-depth", parts + cnn)
  assert [c.depth for _, c in parts] == [1, 3]
  res = R.run_preset("tiny-depth", tmp_path / "out", progress=False, verbose=False,
                     figures=tmp_path / "fig")
  assert set(res) == {"tiny-mlp-d1", "tiny-mlp-d3", "tiny-cnn-d2", "tiny-cnn-d3"}
  assert res["tiny-cnn-d3"]["num_basis_paths"] > res["tiny-cnn-d2"]["num_basis_paths"]
  assert res["tiny-mlp-d3"]["num_basis_paths"] > res["tiny-mlp-d1"]["num_basis_paths"]
  table = (tmp_path / "out" / "tiny-mlp" / "table.md").read_text()
  assert "| depth | sgd | gsgd | gsgd_paper |" in table and "gsgd - sgd" in table
  with open(tmp_path / "out" / "tiny-mlp" / "depth.csv") as f:
    rows = list(csv.DictReader(f))
  assert {(r["depth"], r["optimizer"]) for r in rows} == {
      (d, o) for d in ("1", "3") for o in ("sgd", "gsgd", "gsgd_paper")}
  for png in ("tiny-mlp-depth.png", "tiny-cnn-depth.png", "tiny-depth-depth.png"):
    assert (tmp_path / "fig" / png).read_bytes().startswith(PNG_MAGIC)
  assert not list((tmp_path / "out").glob("*-comparison"))  # no spurious rescaling comparison
  # --reuse: runs already there with the same configuration are read, not trained again; a grid
  # extended by one lr trains only that lr; a part whose configuration changed is rerun.
  run_file = tmp_path / "out" / "tiny-mlp-d1" / "runs" / "sgd_lr0.1_seed0.json"
  stamp = run_file.stat().st_mtime_ns
  (tmp_path / "out" / "tiny-mlp" / "depth.png").unlink()

  def changed(p, c):
    if p == "tiny-cnn-d3":
      return c.replace(epochs=2)
    if p.startswith("tiny-mlp"):
      return c.replace(lrs={**c.lrs, "sgd": (0.1, 0.3)})
    return c

  monkeypatch.setitem(C.PRESETS, "tiny-depth", [(p, changed(p, c)) for p, c in parts + cnn])
  again = R.run_preset("tiny-depth", tmp_path / "out", progress=False, verbose=False, reuse=True)
  assert run_file.stat().st_mtime_ns == stamp
  assert (tmp_path / "out" / "tiny-mlp-d1" / "runs" / "sgd_lr0.3_seed0.json").exists()
  assert again["tiny-mlp-d1"]["reused_runs"] == 3 and again["tiny-cnn-d2"]["reused_runs"] == 1
  assert again["tiny-cnn-d3"]["reused_runs"] == 0  # epochs changed: rerun
  assert again["tiny-cnn-d3"]["config"]["epochs"] == 2
  for o in ("gsgd", "gsgd_paper"):
    assert again["tiny-mlp-d3"]["best"][o] == json.loads(json.dumps(res["tiny-mlp-d3"]["best"][o]))
  assert (tmp_path / "out" / "tiny-mlp" / "depth.png").read_bytes().startswith(PNG_MAGIC)
  assert (tmp_path / "out" / "depth.png").exists()


def test_depth_table_verdicts():
  def res(acc_std, seeds=5):
    best = {o: {"lr": 0.1, "at_grid_edge": o == "gsgd", "seeds": seeds, "diverged": 0,
                "test_accuracy_mean": m, "test_accuracy_std": s, "val_accuracy_mean": m,
                "val_accuracy_std": s, "train_loss_mean": 0.5, "train_loss_std": 0.01}
            for o, (m, s) in acc_std.items()}
    return {"best": best, "config": {"seeds": seeds, "epochs": 1, "batch_size": 8,
                                     "schedule": "cosine", "init": "default"},
            "total_wall_time": 1.0}
  t = report.depth_table([
      (4, res({"sgd": (0.80, 0.01), "gsgd": (0.85, 0.01), "adam": (0.9, 0.02),
               "gsgd_adam": (0.89, 0.02)})),
      (2, res({"sgd": (0.80, 0.01), "gsgd": (0.70, 0.02), "adam": (0.9, 0.02),
               "gsgd_adam": (0.9, 0.02)}))], "t")
  lines = t.splitlines()
  assert "| 2 | -10.0 (behind, std 2.0) | +0.0 (tie, std 2.0) |" in lines
  assert "| 4 | +5.0 (ahead, std 1.0) | -1.0 (tie, std 2.0) |" in lines
  assert "85.0 ± 1.0 (0.1*)" in t  # grid edge marked
