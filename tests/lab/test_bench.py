"""Smoke tests of the benchmark scripts (no timings are asserted: speed lives in bench/)."""

import importlib.util
import os
import sys

import pytest

pytestmark = pytest.mark.usefixtures("fast_compiles")

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "bench")


def _load(name):
  sys.path.insert(0, BENCH)
  try:
    spec = importlib.util.spec_from_file_location(name, os.path.join(BENCH, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # (flax modules are dataclasses: their module must be importable)
    spec.loader.exec_module(module)
    return module
  finally:
    sys.path.remove(BENCH)


def test_bench_quick_table(tmp_path, capsys):
  bench = _load("bench")
  out = tmp_path / "table.md"
  bench.main(["--quick", "--models", "mlp1024", "--rounds", "1", "--iters", "1",
              "--compare-modulo", "--out", str(out)])
  table = out.read_text()
  assert "aligned / modulo" in table
  rows = [l for l in table.splitlines() if l.startswith("| mlp1024")]
  assert [r.split("|")[2].strip() for r in rows] == ["sgd", "momentum", "adam"]
  for r in rows:
    ratio = float(r.split("|")[5].strip().strip("*x"))
    assert ratio > 0 and float(r.split("|")[10].strip().strip("x")) > 0


def test_bench_params_use_reference_init():
  bench = _load("bench")
  import numpy as np
  import gsgd_jax
  _, variables, _, _, structure = bench.build("mlp1024", True)
  mask = gsgd_jax.skeleton_mask(structure, variables["params"])
  kernel = np.asarray(variables["params"]["Dense_1"]["kernel"])
  np.testing.assert_array_equal(kernel[np.asarray(mask["Dense_1"]["kernel"])], 1.0)


@pytest.mark.parametrize("model", ["mlp1024"])
def test_hlo_report(model, capsys):
  report = _load("hlo_report")
  report.main(["--model", model, "--quick"])
  text = capsys.readouterr().out
  assert "| dots |" in text
  host = [l for l in text.splitlines() if l.startswith("| host round trips")][0]
  assert host.split("|")[2:5] == [" 0 ", " 0 ", " 0 "]  # tx.update never leaves the device


def test_bench_plainnet34bn_builds_and_steps():
  """The BatchNorm case (issue 11): reference-policy structure through BN, one step per
  bn_scaling variant at tiny widths (finite loss), and the table's extra column."""
  bench = _load("bench")
  import jax
  import numpy as np
  model, variables, x, y, structure = bench.build("plainnet34bn", True, div=16)
  assert len(structure.chains) == 1 and len(structure.chains[0].layers) == 34
  assert sum(layer.normalized for layer in structure.chains[0].layers) == 33  # not the head
  variants = bench._variants("plainnet34bn", ["sgd"])
  assert [(row, pair) for row, pair, _ in variants] == [
      ("momentum bn=None", "momentum"), ("momentum bn=weight", "momentum"),
      ("momentum bn=noweight", "momentum")]
  params, bs = variables["params"], variables["batch_stats"]
  _, _, make_gsgd = variants[1]  # bn_scaling="weight", the default
  tx = make_gsgd(structure)
  step = bench.make_step(model, tx, has_bn=True)
  carry = jax.tree.map(lambda a: a.copy(), (params, bs, tx.init(params)))
  new_params, new_bs, _, loss = step(*carry, x, y)
  assert np.isfinite(float(loss))
  assert jax.tree.structure(new_params) == jax.tree.structure(params)
  assert jax.tree.structure(new_bs) == jax.tree.structure(bs)
  row = dict(model="plainnet34bn", pair="momentum bn=weight", base_ms=1.0, gsgd_ms=1.5,
             ratio=1.5, aligned_over_modulo=None, over_bn_none=1.2, finite=True,
             compile_base=0.1, compile_gsgd=0.2, temp_base=None, temp_gsgd=None, state_base=0,
             state_gsgd=0, param_bytes=0)
  table = bench.format_table([row], True)
  assert "over bn=None" in table and "| 1.200x |" in table


def test_bench_stacks_table(capsys):
  """The scanned stack and its unrolled twin trace to one chain each, and both steps run."""
  bench = _load("bench_stacks")
  bench.main(["--width", "8", "--depth", "3", "--batch", "4", "--rounds", "1", "--iters", "1",
              "--profile"])
  text = capsys.readouterr().out
  timed, _, profiled = text.partition("Thread time of the update's ops")
  rows = [l for l in timed.splitlines() if l.startswith(("| stacked", "| unrolled"))]
  assert len(rows) == 4 and all(float(r.split("|")[5].split()[0]) > 0 for r in rows)
  # The profile table: the update's own ops were found in the trace (G-space does more work than
  # its weight-space twin on every row), unless this jaxlib has no trace reader.
  if "skipped" not in profiled:
    rows = [l for l in profiled.splitlines() if l.startswith(("| stacked", "| unrolled"))]
    assert len(rows) == 4
    assert all(0 < float(r.split("|")[3]) < float(r.split("|")[4]) for r in rows)
